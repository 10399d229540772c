"""Models: the Retention LLM (tiny..7b) and the MLA transformer, as Hugging Face models.

    from llmtrain.models import RetentionLLM, create_model_config
    model = RetentionLLM(create_model_config("small"))

Importing this package registers both model types with AutoConfig, AutoModel,
AutoModelForCausalLM and AutoModelForSequenceClassification, so ``from_pretrained(path)`` works
on saved checkpoints.
"""

from llmtrain.models.cache import RetentionCache
from llmtrain.models.config import (
    MLAConfig,
    RetentionConfig,
    create_model_config,
    preset_names,
)
from llmtrain.models.mla import MLAForCausalLM, MLAForSequenceClassification, MLAModel, MLATransformer
from llmtrain.models.registry import build_model, register_auto_classes
from llmtrain.models.retention import RetentionForSequenceClassification, RetentionLLM, RetentionModel
from llmtrain.models.sizing import count_parameters, mla_cache_bytes_per_token, retention_state_bytes

register_auto_classes()

__all__ = [
    "MLAConfig",
    "MLAForCausalLM",
    "MLAForSequenceClassification",
    "MLAModel",
    "MLATransformer",
    "RetentionCache",
    "RetentionConfig",
    "RetentionForSequenceClassification",
    "RetentionLLM",
    "RetentionModel",
    "build_model",
    "count_parameters",
    "create_model_config",
    "mla_cache_bytes_per_token",
    "preset_names",
    "register_auto_classes",
    "retention_state_bytes",
]
