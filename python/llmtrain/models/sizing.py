"""Sizes computed from a config alone: parameter counts (on the meta device) and decoding-cache bytes."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from llmtrain.models.config import MLAConfig, RetentionConfig
from llmtrain.ops import feature_dim


def count_parameters(config: PretrainedConfig, task: str = "causal-lm") -> int:
    """Unique parameters of the model ``config`` describes (tied weights counted once).

    The model is built on the meta device: shapes only, nothing allocated, so 7B costs nothing.
    """
    from llmtrain.models.registry import build_model

    with torch.device("meta"):
        model = build_model(config, task)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mla_cache_bytes_per_token(config: MLAConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Decoding-cache bytes per token (all layers) of an MLA model and of an MHA model of the same width.

    MLA caches the normalised KV latent and the shared rotary key: (kv_lora_rank + qk_rope_head_dim)
    values per layer. Multi-head attention of width hidden_size caches a key and a value of that width:
    2 * hidden_size values per layer. Returns {"mla": bytes, "mha": bytes, "ratio": mha / mla}.
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(f"mla_cache_bytes_per_token: expected an MLAConfig, got {type(config).__name__}")
    size = _element_size(dtype) * config.num_hidden_layers
    mla = (config.kv_lora_rank + config.qk_rope_head_dim) * size
    mha = 2 * config.hidden_size * size
    return {"mla": mla, "mha": mha, "ratio": mha / mla}


def retention_state_bytes(config: RetentionConfig, batch_size: int = 1) -> int:
    """Bytes of a retention model's decoding state (float32), the same after 1 token or 1M.

    Per layer and KV head: the state [D, head_dim] and the sum of keys [D], D = head_dim(head_dim+1)/2.
    """
    if not isinstance(config, RetentionConfig):
        raise TypeError(f"retention_state_bytes: expected a RetentionConfig, got {type(config).__name__}")
    D = feature_dim(config.head_dim, 2)
    per_head = D * config.head_dim + D
    return 4 * batch_size * config.num_hidden_layers * config.num_key_value_heads * per_head
