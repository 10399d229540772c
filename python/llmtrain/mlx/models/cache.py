"""Decoding state for the MLX models: one entry per layer plus the number of tokens read.

Retention layers keep a ``RetentionState`` (state [b, kv_heads, D, head_dim] and sum_of_keys
[b, kv_heads, D], float32; constant size whatever the context). MLA layers keep the normalised KV
latents [b, tokens, kv_lora_rank] and the shared rotary keys [b, tokens, qk_rope_head_dim], as the
torch model's DynamicCache does. MLX arrays are immutable: each forward replaces a layer's entry.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten


class DecodingCache:
    def __init__(self, num_layers: int):
        self.layers: list[Any] = [None] * num_layers
        self.offset = 0  # tokens absorbed so far

    def __repr__(self) -> str:
        return f"DecodingCache(layers={len(self.layers)}, offset={self.offset}, bytes={self.nbytes()})"

    def arrays(self) -> list[mx.array]:
        """Every array held (to mx.eval them between decoding steps)."""
        return [a for _, a in tree_flatten([tuple(entry) for entry in self.layers if entry is not None])]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
