"""The MLA transformer in MLX, mirroring llmtrain.models.mla (same config, parameter names and
function; see that module for the architecture).

Training and prefill expand per-head keys and values and call ``mx.fast.scaled_dot_product_attention``
with a causal mask. Decoding caches only the normalised KV latent and the shared rotary key per token
and attends with W_UK absorbed into the query and W_UV into the output.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from llmtrain.mlx.models.cache import DecodingCache
from llmtrain.mlx.models.layers import (
    NormLinear,
    OutputProjection,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    rotary_cos_sin,
    run_checkpointed,
)
from llmtrain.models.config import MLAConfig


def allowed_keys(query_len: int, past_len: int, key_mask: Optional[mx.array]) -> mx.array:
    """Boolean [batch or 1, 1, query_len, past_len + query_len]: query i (at position past_len + i) may
    read key j when j <= past_len + i and key j is not padding; a token always reads itself."""
    total = past_len + query_len
    query_pos = mx.arange(past_len, total)[:, None]
    key_pos = mx.arange(total)[None, :]
    allowed = (key_pos <= query_pos)[None, None]
    if key_mask is not None:
        allowed = mx.logical_and(allowed, key_mask.astype(mx.bool_)[:, None, None, :total])
        allowed = mx.logical_or(allowed, (key_pos == query_pos)[None, None])
    return allowed


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.q_rank, self.kv_rank, self.rope_theta = config.q_lora_rank, config.kv_lora_rank, config.rope_theta
        self.softmax_scale = (self.nope_dim + self.rope_dim) ** -0.5
        eps = config.rms_norm_eps
        self.latent_proj = NormLinear(config.hidden_size, self.q_rank + self.kv_rank + self.rope_dim, eps)
        self.q_up_proj = NormLinear(self.q_rank, self.num_heads * (self.nope_dim + self.rope_dim), eps)
        self.kv_up_proj = NormLinear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), eps)
        self.o_proj = OutputProjection(self.num_heads * self.v_dim, config.hidden_size)

    def __call__(self, x: mx.array, position_ids: mx.array, attention_mask: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None) -> mx.array:
        b, t, _ = x.shape
        c_q, c_kv, k_rope = mx.split(self.latent_proj(x), [self.q_rank, self.q_rank + self.kv_rank], axis=-1)
        q = self.q_up_proj(c_q).reshape(b, t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q[..., :self.nope_dim], q[..., self.nope_dim:]
        cos, sin = rotary_cos_sin(position_ids, self.rope_dim, self.rope_theta, x.dtype)   # [b, t, dr]
        q_rope = apply_rotary(q_rope, cos[:, :, None], sin[:, :, None])
        k_rope = apply_rotary(k_rope, cos, sin)

        if cache is None:
            out = self._expanded_attention(q_nope, q_rope, c_kv, k_rope, attention_mask)
        else:
            entry = cache.layers[self.layer_idx]
            latent = self.kv_up_proj.normalize(c_kv)
            if entry is None:  # prefill: as in training; only the latent goes into the cache
                cache.layers[self.layer_idx] = (latent, k_rope)
                out = self._expanded_attention(q_nope, q_rope, c_kv, k_rope, attention_mask)
            else:
                past_len = entry[0].shape[1]
                latents = mx.concatenate([entry[0], latent], axis=1)
                rope_keys = mx.concatenate([entry[1], k_rope], axis=1)
                cache.layers[self.layer_idx] = (latents, rope_keys)
                out = self._absorbed_attention(q_nope, q_rope, latents, rope_keys, past_len, attention_mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim))

    def _expanded_attention(self, q_nope, q_rope, c_kv, k_rope, attention_mask) -> mx.array:
        """Full per-head keys and values, causal SDPA. Returns [b, t, heads, v_dim]."""
        b, t, h, _ = q_nope.shape
        kv = self.kv_up_proj(c_kv).reshape(b, t, h, self.nope_dim + self.v_dim)
        k_nope, v = kv[..., :self.nope_dim], kv[..., self.nope_dim:]
        q = mx.concatenate([q_nope, q_rope], axis=-1).transpose(0, 2, 1, 3)
        k_rope = mx.broadcast_to(k_rope[:, :, None], (b, t, h, self.rope_dim))
        k = mx.concatenate([k_nope, k_rope], axis=-1).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if attention_mask is None:
            mask = "causal"
        else:
            mask = allowed_keys(t, attention_mask.shape[1] - t, attention_mask)[..., -t:]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, mask=mask)
        return out.transpose(0, 2, 1, 3)

    def _absorbed_attention(self, q_nope, q_rope, latents, rope_keys, past_len, attention_mask) -> mx.array:
        """Attention over cached latents [b, T, kv_rank] and rotary keys [b, T, dr] without expanding them."""
        t = q_nope.shape[1]
        w = self.kv_up_proj.weight.astype(q_nope.dtype).reshape(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]
        q_latent = mx.einsum("bthn,hnr->bhtr", q_nope, w_uk)
        scores = mx.einsum("bhtr,bsr->bhts", q_latent, latents) + mx.einsum("bthp,bsp->bhts", q_rope, rope_keys)
        scores = scores.astype(mx.float32) * self.softmax_scale
        allowed = allowed_keys(t, past_len, attention_mask)
        probs = mx.softmax(mx.where(allowed, scores, -mx.inf), axis=-1).astype(latents.dtype)
        out_latent = mx.einsum("bhts,bsr->bthr", probs, latents)
        return mx.einsum("bthr,hvr->bthv", out_latent, w_uv)


class MLABlock(nn.Module):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.attn = MultiHeadLatentAttention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.rms_norm_eps)

    def __call__(self, x: mx.array, position_ids: mx.array, attention_mask: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None) -> mx.array:
        x = x + self.attn(x, position_ids, attention_mask, cache)
        return x + self.mlp(x)


class MLAModel(nn.Module):
    """Embeddings, MLA blocks and the final norm; returns hidden states."""

    def __init__(self, config: MLAConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [MLABlock(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def __call__(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None, compute_dtype=None,
                 position_ids: Optional[mx.array] = None) -> mx.array:
        hidden = self.embed_tokens(input_ids)
        if compute_dtype is not None:
            hidden = hidden.astype(compute_dtype)
        b, t = hidden.shape[:2]
        if position_ids is None:  # RoPE is relative: left padding shifting every position changes nothing
            past_len = cache.offset if cache is not None else 0
            position_ids = mx.broadcast_to(mx.arange(past_len, past_len + t)[None], (b, t))
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be [batch, past + new tokens] of 0/1, got shape "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask is not None and bool(mx.all(attention_mask)):
            attention_mask = None  # no padding: the plain causal path
        for layer in self.layers:
            if self.gradient_checkpointing and cache is None:
                hidden = run_checkpointed(layer, hidden, position_ids, attention_mask)
            else:
                hidden = layer(hidden, position_ids, attention_mask, cache)
        if cache is not None:
            cache.offset += t
        return self.norm(hidden)
