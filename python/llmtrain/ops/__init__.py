"""Fused ops with autograd: gated power retention and RMSNorm + Linear.

Each op's folder holds its float64 reference (``reference.py``) beside the op (``op.py``) that
dispatches to the native kernels in ``llmtrain._C``.
"""

from llmtrain.ops.power_retention import (
    RetentionState,
    default_chunk_size,
    feature_dim,
    power_retention,
    power_retention_step,
    sym_power_features,
)
from llmtrain.ops.rmsnorm_linear import rmsnorm_linear

__all__ = [
    "RetentionState",
    "default_chunk_size",
    "feature_dim",
    "power_retention",
    "power_retention_step",
    "rmsnorm_linear",
    "sym_power_features",
]
