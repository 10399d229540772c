"""The Retention LLM in MLX, mirroring llmtrain.models.retention (same config, parameter names and
function; see that module for the architecture).

Training and prefill run the chunked ``power_retention`` op; decoding advances each layer's
recurrent state with ``power_retention_step`` (O(1) work and memory per token).
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from llmtrain.mlx.models.cache import DecodingCache
from llmtrain.mlx.models.layers import NormLinear, OutputProjection, RMSNorm, SwiGLU, run_checkpointed
from llmtrain.mlx.ops import power_retention, power_retention_step
from llmtrain.models.config import RetentionConfig
from llmtrain.models.retention import PAD_RESET_LOG_GATE


def padding_reset_offsets(attention_mask: Optional[mx.array], seq_len: int) -> Optional[mx.array]:
    """[batch, seq_len] additions to log_g closing the gate at each token that follows padding
    (torch: llmtrain.models.retention.padding_reset_offsets). attention_mask is [batch, past + seq_len]."""
    if attention_mask is None or attention_mask.ndim != 2 or bool(mx.all(attention_mask)):
        return None
    mask = attention_mask.astype(mx.bool_)
    follows_pad = mx.logical_and(mask[:, 1:], mx.logical_not(mask[:, :-1]))
    follows_pad = mx.concatenate([mx.zeros((mask.shape[0], 1), mx.bool_), follows_pad], axis=1)
    return follows_pad[:, -seq_len:].astype(mx.float32) * PAD_RESET_LOG_GATE


class PowerRetentionAttention(nn.Module):
    """Gated power retention over heads of ``head_dim`` channels, with optional grouped KV heads."""

    def __init__(self, config: RetentionConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.qk_norm, self.chunk_size = config.head_dim, config.qk_norm, config.chunk_size
        d = self.head_dim
        q_end = self.num_heads * d
        k_end = q_end + self.num_kv_heads * d
        v_end = k_end + self.num_kv_heads * d
        self.split_points = [q_end, k_end, v_end]   # q | k | v | gate
        self.qkvg_proj = NormLinear(config.hidden_size, v_end + self.num_kv_heads, config.rms_norm_eps)
        self.gate_bias = mx.zeros((self.num_kv_heads,))
        if self.qk_norm == "rms":
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = OutputProjection(self.num_heads * d, config.hidden_size)

    def _normalize_qk(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        if self.qk_norm == "rms":
            return self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "l2":
            def unit(x):  # torch's F.normalize (eps 1e-12) times sqrt(head_dim)
                norm = mx.sqrt((x.astype(mx.float32) ** 2).sum(-1, keepdims=True))
                return (x / mx.maximum(norm, 1e-12).astype(x.dtype)) * math.sqrt(self.head_dim)
            return unit(q), unit(k)
        return q, k

    def __call__(self, x: mx.array, log_g_offset: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None) -> mx.array:
        b, t, _ = x.shape
        q, k, v, gate = mx.split(self.qkvg_proj(x), self.split_points, axis=-1)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = self._normalize_qk(q, k)
        log_g = nn.log_sigmoid(gate.astype(mx.float32) + self.gate_bias.astype(mx.float32))  # [b, t, kv], <= 0
        if log_g_offset is not None:
            log_g = log_g + log_g_offset[..., None]
        y = self._retain(q, k, v, log_g, cache)
        return self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))

    def _retain(self, q, k, v, log_g, cache: Optional[DecodingCache]) -> mx.array:
        if cache is None:
            return power_retention(q, k, v, log_g, chunk_size=self.chunk_size)
        state = cache.layers[self.layer_idx]
        if state is not None and q.shape[1] == 1:
            y, state = power_retention_step(q, k, v, log_g, state=state)
        else:  # prefill, or several new tokens: the parallel op from the state so far
            y, state = power_retention(q, k, v, log_g, chunk_size=self.chunk_size, initial_state=state,
                                       return_state=True)
        cache.layers[self.layer_idx] = state
        return y


class RetentionBlock(nn.Module):
    def __init__(self, config: RetentionConfig, layer_idx: int):
        super().__init__()
        self.attn = PowerRetentionAttention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, log_g_offset: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None) -> mx.array:
        x = x + self.attn(x, log_g_offset, cache)
        return x + self.mlp(x)


class RetentionModel(nn.Module):
    """Embeddings, retention blocks and the final norm; returns hidden states."""

    def __init__(self, config: RetentionConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [RetentionBlock(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def __call__(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None, compute_dtype=None) -> mx.array:
        hidden = self.embed_tokens(input_ids)
        if compute_dtype is not None:
            hidden = hidden.astype(compute_dtype)
        log_g_offset = padding_reset_offsets(attention_mask, hidden.shape[1])
        for layer in self.layers:
            if self.gradient_checkpointing and cache is None:
                hidden = run_checkpointed(layer, hidden, log_g_offset)
            else:
                hidden = layer(hidden, log_g_offset, cache)
        if cache is not None:
            cache.offset += hidden.shape[1]
        return self.norm(hidden)
