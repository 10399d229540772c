"""Registration with transformers' Auto classes, and ``build_model`` from a config."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from llmtrain.models.config import MLAConfig, RetentionConfig
from llmtrain.models.mla import MLAForCausalLM, MLAForSequenceClassification, MLAModel
from llmtrain.models.retention import RetentionForSequenceClassification, RetentionLLM, RetentionModel

_MODELS = {
    RetentionConfig: (RetentionModel, RetentionLLM, RetentionForSequenceClassification),
    MLAConfig: (MLAModel, MLAForCausalLM, MLAForSequenceClassification),
}


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModel* load saved llmtrain checkpoints by path (idempotent)."""
    for config_class, (base, causal_lm, classifier) in _MODELS.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, base, exist_ok=True)
        AutoModelForCausalLM.register(config_class, causal_lm, exist_ok=True)
        AutoModelForSequenceClassification.register(config_class, classifier, exist_ok=True)


def build_model(config: PretrainedConfig, task: str = "causal-lm"):
    """A freshly initialised model for ``config``: task "causal-lm" (default), "sequence-classification"
    (reward and value models) or "base" (hidden states only)."""
    for config_class, (base, causal_lm, classifier) in _MODELS.items():
        if isinstance(config, config_class):
            models = {"causal-lm": causal_lm, "sequence-classification": classifier, "base": base}
            if task not in models:
                raise ValueError(f"build_model: task must be one of {sorted(models)}, got {task!r}")
            return models[task](config)
    raise TypeError(f"build_model: expected a RetentionConfig or MLAConfig, got {type(config).__name__}")
