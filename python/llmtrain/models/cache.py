"""Decoding caches.

``RetentionCache`` holds, per retention layer, the recurrent state of power retention: the
state S [batch, kv_heads, D, head_dim] and the sum of keys z [batch, kv_heads, D] (D =
head_dim*(head_dim+1)/2, float32). Its size does not depend on how many tokens were read, so a
retention model decodes with O(1) memory per token, like Mamba's ``cache_params`` in transformers.
It subclasses transformers' ``Cache`` so that ``generate`` treats it as a cache (beam reordering,
repeated sequences, returning it to the caller).

The MLA model needs no class of its own: transformers' ``DynamicCache`` stores, per layer, the
normalised KV latent in the "keys" slot ([batch, 1, tokens, kv_lora_rank]) and the shared rotary
key in the "values" slot ([batch, 1, tokens, qk_rope_head_dim]); see mla.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache

from llmtrain.ops import RetentionState


class RetentionLayerCache:
    """One layer's RetentionState, allocated by the first forward that uses it."""

    is_compileable = False
    is_sliding = False

    def __init__(self):
        self.state: Optional[RetentionState] = None

    def __repr__(self) -> str:
        shapes = None if self.state is None else tuple(self.state.state.shape)
        return f"RetentionLayerCache(state={shapes})"

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = RetentionState(fn(self.state.state).contiguous(), fn(self.state.sum_of_keys).contiguous())

    def reset(self) -> None:
        if self.state is not None:
            self.state.state.zero_()
            self.state.sum_of_keys.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:  # states are small and read every step: keep them where they are
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent retention state cannot drop tokens it has already absorbed")

    def get_max_length(self) -> int:
        return -1


class RetentionCache(Cache):
    """Recurrent states of all retention layers of a model, plus the number of tokens they have read."""

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[RetentionLayerCache() for _ in range(num_layers)])
        self.seen_tokens = 0

    def __repr__(self) -> str:
        return f"RetentionCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"

    def get_state(self, layer_idx: int) -> Optional[RetentionState]:
        return self.layers[layer_idx].state

    def set_state(self, layer_idx: int, state: RetentionState) -> None:
        self.layers[layer_idx].state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens absorbed so far (generation uses it to tell new tokens from the prompt)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def nbytes(self) -> int:
        """Bytes held by all layers' states (constant in the number of tokens read)."""
        total = 0
        for layer in self.layers:
            if layer.state is not None:
                total += sum(t.numel() * t.element_size() for t in layer.state)
        return total
