"""MLX ops: gated power retention and fused RMSNorm + Linear, as ``mx.custom_function``s with
hand-written VJPs.

Two implementations behind each op: Metal kernels (``metal/*.metal``, JIT-compiled by MLX through
``mx.fast.metal_kernel``) when ``mx.metal.is_available()``, else pure MLX ops. ``set_backend``
(or the environment variable ``LLMTRAIN_MLX_KERNELS=metal|mlx``) forces one. See docs/mlx.md.
"""

from llmtrain.mlx.ops._kernels import backend, set_backend
from llmtrain.mlx.ops.power_retention import (
    RetentionState,
    default_chunk_size,
    feature_dim,
    power_retention,
    power_retention_step,
)
from llmtrain.mlx.ops.rmsnorm_linear import rmsnorm_linear

__all__ = [
    "RetentionState",
    "backend",
    "default_chunk_size",
    "feature_dim",
    "power_retention",
    "power_retention_step",
    "rmsnorm_linear",
    "set_backend",
]
