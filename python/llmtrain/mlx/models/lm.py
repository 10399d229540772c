"""The causal language models: a backbone (RetentionModel or MLAModel) and the vocabulary projection.

    model = build_model(create_model_config("tiny"))     # the same configs as the torch models
    logits = model(input_ids)                            # [batch, time, vocab]

With ``tie_word_embeddings`` there is no ``lm_head`` parameter: the embedding matrix projects (the
torch models' ``lm_head.weight`` is the same tensor, and their checkpoints store it once).
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from transformers import PretrainedConfig

from llmtrain.mlx.models.cache import DecodingCache
from llmtrain.mlx.models.layers import Linear, NormLinear, OutputProjection, RMSNorm
from llmtrain.mlx.models.mla import MLAModel
from llmtrain.mlx.models.retention import PowerRetentionAttention, RetentionModel
from llmtrain.models.config import MLAConfig, RetentionConfig


class CausalLM(nn.Module):
    """Shared by both models; subclasses name their backbone class."""

    backbone_class: type

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = self.backbone_class(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        # Activations' dtype (None: the weights' dtype). float32 weights with bfloat16 compute is
        # torch's autocast: the layers cast their weights to the activations' dtype.
        self.compute_dtype = None

    @property
    def tied(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (mx.checkpoint per block)."""
        self.model.gradient_checkpointing = enabled

    def make_cache(self) -> DecodingCache:
        return DecodingCache(self.config.num_hidden_layers)

    def project(self, hidden: mx.array) -> mx.array:
        """Hidden states -> logits (in the hidden states' dtype)."""
        if self.tied:
            return hidden @ self.model.embed_tokens.weight.astype(hidden.dtype).T
        return self.lm_head(hidden)

    def __call__(self, input_ids: mx.array, attention_mask: Optional[mx.array] = None,
                 cache: Optional[DecodingCache] = None, logits_to_keep: int = 0, **backbone_kwargs) -> mx.array:
        hidden = self.model(input_ids, attention_mask=attention_mask, cache=cache,
                            compute_dtype=self.compute_dtype, **backbone_kwargs)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.project(hidden)

    def num_parameters(self) -> int:
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def init_weights(self, seed: int = 0) -> "CausalLM":
        """The torch models' initialisation (llmtrain.models.hf.init_common_weights): N(0, std) weights
        and embeddings, std / sqrt(2 * layers) for output projections, unit norms, and the retention
        gates' half-life biases. Deterministic in ``seed`` (MLX's generator, so not torch's values)."""
        from llmtrain.models.retention import gate_bias_for_half_lives

        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        key = mx.random.key(seed)

        def normal(shape, scale):
            nonlocal key
            key, sub = mx.random.split(key)
            return mx.random.normal(shape, key=sub) * scale

        for _, module in self.named_modules():
            if isinstance(module, OutputProjection):
                module.weight = normal(module.weight.shape, residual_std)
            elif isinstance(module, (Linear, nn.Embedding)):
                module.weight = normal(module.weight.shape, std)
            elif isinstance(module, NormLinear):
                module.norm_weight = mx.ones(module.norm_weight.shape)
                module.weight = normal(module.weight.shape, std)
            elif isinstance(module, RMSNorm):
                module.weight = mx.ones(module.weight.shape)
            elif isinstance(module, PowerRetentionAttention):
                bias = gate_bias_for_half_lives(module.num_kv_heads, self.config.gate_half_life_range)
                module.gate_bias = mx.array(bias.numpy())
        mx.eval(self.parameters())
        return self


class RetentionLLM(CausalLM):
    """The Retention LLM (tiny..7b presets)."""

    backbone_class = RetentionModel


class MLAForCausalLM(CausalLM):
    """The MLA transformer; ``position_ids`` [batch, time] may be passed (default: positions after the cache)."""

    backbone_class = MLAModel


MLATransformer = MLAForCausalLM


def build_model(config: PretrainedConfig, seed: Optional[int] = 0) -> CausalLM:
    """The MLX model for a RetentionConfig or MLAConfig, initialised with ``seed`` (None: leave
    placeholder weights, to be loaded)."""
    if isinstance(config, RetentionConfig):
        model = RetentionLLM(config)
    elif isinstance(config, MLAConfig):
        model = MLAForCausalLM(config)
    else:
        raise TypeError(f"build_model: expected a RetentionConfig or MLAConfig, got {type(config).__name__}")
    if seed is not None:
        model.init_weights(seed)
    return model
