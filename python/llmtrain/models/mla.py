"""The MLA transformer: a pre-norm decoder with DeepSeek-V2 Multi-head Latent Attention and SwiGLU.

Per token, one fused RMSNorm+Linear makes three things from the residual stream:
    c_q    [q_lora_rank]       query latent -> RMSNorm -> W_UQ -> per head: q_nope [dn] and q_rope [dr]
    c_kv   [kv_lora_rank]      joint KV latent -> RMSNorm -> W_UK -> k_nope [dn], W_UV -> v [dv] per head
    k_rope [dr]                one rotary key shared by all heads (decoupled RoPE)
score_h(i, j) = (q_nope_h,i . k_nope_h,j + q_rope_h,i . k_rope_j) / sqrt(dn + dr).

Training and prefill expand keys and values per head and call scaled_dot_product_attention
(FlashAttention on GPU). Decoding caches only (c_kv normalised, k_rope): kv_lora_rank + dr numbers per
token per layer. It never rebuilds keys or values: W_UK is absorbed into the query
(q_nope . W_UK c = (W_UK^T q_nope) . c) and W_UV into the output (sum_j p_j W_UV c_j = W_UV sum_j p_j c_j).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from llmtrain.models.config import MLAConfig
from llmtrain.models.hf import CausalLMHead, DecoderStack, SequenceClassificationHead, cache_argument, init_common_weights
from llmtrain.models.layers import NormLinear, OutputProjection, SwiGLU, apply_rotary, rotary_cos_sin


def allowed_keys(query_len: int, past_len: int, key_mask: Optional[Tensor], device) -> Tensor:
    """Boolean [batch or 1, 1, query_len, past_len + query_len]: query i (at position past_len + i) may
    read key j when j <= past_len + i and key j is not padding. A token always reads itself, so the rows
    of padding queries are never empty (their outputs are unused but must stay finite)."""
    total = past_len + query_len
    query_pos = torch.arange(past_len, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :total]
        allowed = allowed | (key_pos == query_pos)[None, None]
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
        # The block's pre-norm fused with the joint down projection (W_DQ, W_DKV, W_KR stacked).
        self.latent_proj = NormLinear(config.hidden_size, self.q_rank + self.kv_rank + self.rope_dim, eps)
        # Latent norms fused with the up projections: W_UQ (q_nope and q_rope), and W_UK / W_UV.
        self.q_up_proj = NormLinear(self.q_rank, self.num_heads * (self.nope_dim + self.rope_dim), eps)
        self.kv_up_proj = NormLinear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), eps)
        self.o_proj = OutputProjection(self.num_heads * self.v_dim, config.hidden_size)

    def forward(self, x: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[DynamicCache] = None) -> Tensor:
        b, t, _ = x.shape
        c_q, c_kv, k_rope = self.latent_proj(x).split([self.q_rank, self.kv_rank, self.rope_dim], dim=-1)
        q = self.q_up_proj(c_q).view(b, t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = rotary_cos_sin(position_ids, self.rope_dim, self.rope_theta, x.dtype)   # [b, t, dr]
        q_rope = apply_rotary(q_rope, cos[:, :, None], sin[:, :, None])
        k_rope = apply_rotary(k_rope, cos, sin)

        if past_key_values is None:
            out = self._expanded_attention(q_nope, q_rope, c_kv, k_rope, attention_mask)
        else:
            past_len = past_key_values.get_seq_length(self.layer_idx)
            latent = self.kv_up_proj.normalize(c_kv)
            latents, rope_keys = past_key_values.update(latent[:, None], k_rope[:, None], self.layer_idx)
            if past_len == 0:
                # Prefill: same as training; only the latent went into the cache.
                out = self._expanded_attention(q_nope, q_rope, c_kv, k_rope, attention_mask)
            else:
                out = self._absorbed_attention(q_nope, q_rope, latents[:, 0], rope_keys[:, 0], past_len,
                                               attention_mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim))

    def _expanded_attention(self, q_nope, q_rope, c_kv, k_rope, attention_mask) -> Tensor:
        """Full per-head keys and values, causal SDPA. Returns [b, t, heads, v_dim]."""
        b, t, h, _ = q_nope.shape
        kv = self.kv_up_proj(c_kv).view(b, t, h, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(b, t, h, self.rope_dim)), dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            mask = allowed_keys(t, attention_mask.shape[1] - t, attention_mask, q.device)[..., -t:]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def _absorbed_attention(self, q_nope, q_rope, latents, rope_keys, past_len, attention_mask) -> Tensor:
        """Attention over cached latents [b, T, kv_rank] and rotary keys [b, T, dr] without expanding them."""
        t = q_nope.shape[1]
        w = self.kv_up_proj.weight.to(q_nope.dtype).view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]
        q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)             # W_UK absorbed into the query
        scores = torch.einsum("bhtr,bsr->bhts", q_latent, latents) + torch.einsum("bthp,bsp->bhts", q_rope, rope_keys)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.softmax_scale
        allowed = allowed_keys(t, past_len, attention_mask, scores.device)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(latents.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latents)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)             # W_UV absorbed into the output


class MLABlock(GradientCheckpointingLayer):
    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.attn = MultiHeadLatentAttention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.rms_norm_eps)

    def forward(self, x: Tensor, position_ids: Tensor, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[DynamicCache] = None) -> Tensor:
        x = x + self.attn(x, position_ids, attention_mask, past_key_values=past_key_values)
        return x + self.mlp(x)


class MLAPreTrainedModel(PreTrainedModel):
    config_class = MLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MLABlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_common_weights(module, self.config)


class MLAModel(DecoderStack, MLAPreTrainedModel):
    """Embeddings, MLA blocks and the final norm; returns hidden states."""

    block_class = MLABlock

    def _check_cache(self, past_key_values) -> None:
        if type(past_key_values) is not DynamicCache:
            raise TypeError("past_key_values must be a transformers DynamicCache (it holds the MLA latents), got "
                            f"{type(past_key_values).__name__}")

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        past_key_values = cache_argument(past_key_values, kwargs)
        hidden, cache, output_hidden_states, return_dict = self._start_forward(
            input_ids, inputs_embeds, past_key_values, use_cache, output_hidden_states, return_dict)
        b, t = hidden.shape[:2]
        if position_ids is None:
            # RoPE is relative: left padding shifting every position equally changes nothing.
            past_len = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past_len, past_len + t, device=hidden.device)[None].expand(b, t)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, past + new tokens] of 0/1, got shape "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain causal path (checked once, not per layer)
        return self._run_layers(hidden, (position_ids, attention_mask), cache, output_hidden_states, return_dict)


class MLAForCausalLM(CausalLMHead, MLAPreTrainedModel, GenerationMixin):
    """The causal language model. Loss without full logits: ``model(input_ids, shift_labels=targets)``."""

    base_model_class = MLAModel

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int | Tensor = 0,
        num_items_in_batch: Optional[int | Tensor] = None,
        shift_labels: Optional[Tensor] = None,
        **kwargs,
    ):
        past_key_values = cache_argument(past_key_values, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, past_key_values=past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True)
        return self._causal_lm_output(out, labels, shift_labels, num_items_in_batch, logits_to_keep, return_dict)


# The name the issue and the docs use for the MLA language model.
MLATransformer = MLAForCausalLM


class MLAForSequenceClassification(SequenceClassificationHead, MLAPreTrainedModel):
    """Scores from the hidden state of each sequence's last non-pad token (reward and value models)."""

    base_model_class = MLAModel
