"""The Retention LLM: a pre-norm decoder whose token mixer is gated power retention (degree 2).

Block (pre-norm, residual):
    x = x + o_proj(retention(norm(x) -> q, k, v, gate))      one fused RMSNorm+Linear makes q, k, v, gate
    x = x + down(silu(gate(norm x)) * up(norm x))              SwiGLU, gate and up one fused RMSNorm+Linear

Retention weighs past token j at query i by (q_i.k_j / sqrt(d))^2 * exp(G_i - G_j), G the running
sum of log_g = logsigmoid(gate) per KV head, and normalises by the weights' sum. The gate is the
only notion of order (no positional embedding): it decays old tokens at a learned, data-dependent
rate. Training runs the chunked parallel op; decoding advances an O(1)-size recurrent state with the
step op (see cache.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from llmtrain.models.cache import RetentionCache
from llmtrain.models.config import RetentionConfig
from llmtrain.models.hf import (CausalLMHead, DecoderStack, SequenceClassificationHead, cache_argument, init,
                                init_common_weights, output_cache)
from llmtrain.models.layers import NormLinear, OutputProjection, RMSNorm, SwiGLU
from llmtrain.ops import power_retention, power_retention_step

# Added to log_g at the first real token after left padding: exp(-30) ~ 1e-13, so the state the pad
# tokens built is forgotten (to float32 precision) while every gate factor stays finite.
PAD_RESET_LOG_GATE = -30.0


def gate_bias_for_half_lives(num_heads: int, half_life_range: tuple[float, float]) -> Tensor:
    """Gate biases giving KV heads log-spaced memory half-lives at initialisation.

    A head keeps a fraction g = sigmoid(bias) per token; a half-life of h tokens needs g = 2^(-1/h).
    Spreading h from tens to thousands of tokens gives some heads local and some global memory from the
    start (a zero bias would halve every memory each token).
    """
    low, high = half_life_range
    half_lives = torch.logspace(math.log10(low), math.log10(high), num_heads, dtype=torch.float64)
    keep = torch.exp2(-1.0 / half_lives)
    return torch.logit(keep).float()


def padding_reset_offsets(attention_mask: Optional[Tensor], seq_len: int) -> Optional[Tensor]:
    """[batch, seq_len] additions to log_g that close the gate at each token that follows padding.

    attention_mask covers past and new tokens ([batch, past + seq_len]); the offsets are for the
    last seq_len. Causality already keeps right padding from reaching real tokens.
    """
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return None
    mask = attention_mask.bool()
    follows_pad = torch.zeros_like(mask)
    follows_pad[:, 1:] = mask[:, 1:] & ~mask[:, :-1]
    return follows_pad[:, -seq_len:].to(torch.float32) * PAD_RESET_LOG_GATE


class PowerRetentionAttention(nn.Module):
    """Gated power retention over heads of ``head_dim`` channels, with optional grouped KV heads."""

    def __init__(self, config: RetentionConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.qk_norm, self.chunk_size = config.head_dim, config.qk_norm, config.chunk_size
        d = self.head_dim
        self.split_sizes = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d, self.num_kv_heads]
        self.qkvg_proj = NormLinear(config.hidden_size, sum(self.split_sizes), config.rms_norm_eps)
        self.gate_bias = nn.Parameter(torch.zeros(self.num_kv_heads))
        if self.qk_norm == "rms":
            # (q.k)^2 is unbounded without it: RMS-normalised heads keep |q.k|/sqrt(d) <= sqrt(d) times the
            # learned scales, so the squared weights and their sums stay far from float32 overflow.
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = OutputProjection(self.num_heads * d, config.hidden_size)

    def _normalize_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.qk_norm == "rms":
            return self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "l2":
            scale = math.sqrt(self.head_dim)
            return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1) * scale
        return q, k

    def forward(self, x: Tensor, log_g_offset: Optional[Tensor] = None,
                past_key_values: Optional[RetentionCache] = None) -> Tensor:
        b, t, _ = x.shape
        q, k, v, gate = self.qkvg_proj(x).split(self.split_sizes, dim=-1)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = self._normalize_qk(q, k)
        acc = torch.promote_types(gate.dtype, torch.float32)
        log_g = F.logsigmoid(gate.to(acc) + self.gate_bias.to(acc))       # [b, t, kv_heads], <= 0
        if log_g_offset is not None:
            log_g = log_g + log_g_offset[..., None]
        y = self._retain(q, k, v, log_g, past_key_values)
        return self.o_proj(y.reshape(b, t, self.num_heads * self.head_dim))

    def _retain(self, q, k, v, log_g, cache: Optional[RetentionCache]) -> Tensor:
        if cache is None:
            return power_retention(q, k, v, log_g, chunk_size=self.chunk_size)
        state = cache.get_state(self.layer_idx)
        if state is not None and q.shape[1] == 1:
            # Decoding: update the cached state in place, O(1) work and memory per token.
            y, state = power_retention_step(q, k, v, log_g, state=state, inplace=True)
        else:
            # Prefill (or several new tokens): the parallel op, continuing from the state if there is one.
            y, state = power_retention(q, k, v, log_g, chunk_size=self.chunk_size, initial_state=state,
                                       return_state=True)
        cache.set_state(self.layer_idx, state)
        return y


class RetentionBlock(GradientCheckpointingLayer):
    def __init__(self, config: RetentionConfig, layer_idx: int):
        super().__init__()
        self.attn = PowerRetentionAttention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.rms_norm_eps)

    def forward(self, x: Tensor, log_g_offset: Optional[Tensor] = None,
                past_key_values: Optional[RetentionCache] = None) -> Tensor:
        x = x + self.attn(x, log_g_offset, past_key_values=past_key_values)
        return x + self.mlp(x)


class RetentionPreTrainedModel(PreTrainedModel):
    config_class = RetentionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetentionBlock"]
    # Generation cannot roll a recurrent state back (no assisted decoding), as for Mamba.
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_common_weights(module, self.config)
        if isinstance(module, PowerRetentionAttention):
            init.copy_(module.gate_bias, gate_bias_for_half_lives(module.num_kv_heads, self.config.gate_half_life_range))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: the model builds its RetentionCache on the first forward.
        return False


class RetentionModel(DecoderStack, RetentionPreTrainedModel):
    """Embeddings, retention blocks and the final norm; returns hidden states (no vocabulary projection)."""

    block_class = RetentionBlock

    def _check_cache(self, past_key_values) -> None:
        if not isinstance(past_key_values, RetentionCache):
            raise TypeError(f"past_key_values must be a RetentionCache for a retention model, got "
                            f"{type(past_key_values).__name__}")

    def _new_cache(self) -> RetentionCache:
        return RetentionCache(self.config.num_hidden_layers)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        past_key_values: Optional[RetentionCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        # A cache costs a state copy per layer, so plain forwards do without unless asked or given one.
        past_key_values = cache_argument(past_key_values, kwargs)
        hidden, cache, output_hidden_states, return_dict = self._start_forward(
            input_ids, inputs_embeds, past_key_values, use_cache, output_hidden_states, return_dict)
        seq_len = hidden.shape[1]
        log_g_offset = padding_reset_offsets(attention_mask, seq_len)
        out = self._run_layers(hidden, (log_g_offset,), cache, output_hidden_states, return_dict)
        if cache is not None:
            cache.seen_tokens += seq_len
        return out


class RetentionLLM(CausalLMHead, RetentionPreTrainedModel, GenerationMixin):
    """The causal language model: ``RetentionLLM(create_model_config("small"))``.

    ``model(input_ids, labels=input_ids)`` returns ``.loss`` and ``.logits``.
    ``model(input_ids, shift_labels=targets)`` (targets already shifted) returns only ``.loss``, computed
    chunk by chunk without materialising [batch, time, vocab] logits (config ``fused_cross_entropy``).
    """

    base_model_class = RetentionModel

    def _init_head(self, config: RetentionConfig) -> None:
        super()._init_head(config)
        # The cache of the latest call that used one (generate included); reset_states() drops it.
        self.recurrent_state: Optional[RetentionCache] = None

    def reset_states(self) -> None:
        """Forget the recurrent state kept from the last cached call, before starting a new sequence.

        Each generate() call starts from a fresh state anyway; this zeroes and releases the one the
        model still holds (and which ``past_key_values=model.recurrent_state`` would continue from).
        """
        if self.recurrent_state is not None:
            self.recurrent_state.reset()
        self.recurrent_state = None

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # (the cache arrives in kwargs under whichever name this transformers version's generate uses)
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        # Retention needs no position ids; it reads the mask only to close the gate after left padding.
        inputs.pop("position_ids", None)
        return inputs

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        past_key_values: Optional[RetentionCache] = None,
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
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         past_key_values=past_key_values, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True)
        if output_cache(out) is not None:
            self.recurrent_state = output_cache(out)
        return self._causal_lm_output(out, labels, shift_labels, num_items_in_batch, logits_to_keep, return_dict)


class RetentionForSequenceClassification(SequenceClassificationHead, RetentionPreTrainedModel):
    """Scores from the hidden state of each sequence's last non-pad token (reward and value models)."""

    base_model_class = RetentionModel
