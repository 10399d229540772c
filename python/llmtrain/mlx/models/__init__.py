"""MLX models: the Retention LLM and the MLA transformer in ``mlx.nn`` (issue 10).

They are built from the torch models' configs (``llmtrain.models.create_model_config``) and use the
torch parameter names, so either framework loads the other's safetensors:

    from llmtrain.mlx.models import build_model, load_pretrained, save_pretrained, generate
    model = load_pretrained("runs/quick_start/hf")           # torch save_pretrained dir or checkpoint
    ids = generate(model, [1, 2, 3], 20, temperature=0.8, top_k=50)
"""

from llmtrain.mlx.blas import preload_openblas

preload_openblas()  # before mlx.core: OpenBLAS instead of the reference BLAS on Linux

from llmtrain.mlx.models.cache import DecodingCache
from llmtrain.mlx.models.generate import generate, sample_next_token
from llmtrain.mlx.models.lm import CausalLM, MLAForCausalLM, MLATransformer, RetentionLLM, build_model
from llmtrain.mlx.models.weights import (
    config_from_dict,
    load_pretrained,
    load_weights,
    model_weights,
    read_pretrained,
    save_pretrained,
    save_weights,
    weight_aliases,
)

__all__ = [
    "CausalLM",
    "DecodingCache",
    "MLAForCausalLM",
    "MLATransformer",
    "RetentionLLM",
    "build_model",
    "config_from_dict",
    "generate",
    "load_pretrained",
    "load_weights",
    "model_weights",
    "read_pretrained",
    "sample_next_token",
    "save_pretrained",
    "save_weights",
    "weight_aliases",
]
