"""Gated power retention (symmetric power attention of degree 2), chunked, with a recurrent step."""

from llmtrain.ops.power_retention.op import (
    RetentionState,
    default_chunk_size,
    power_retention,
    power_retention_step,
)
from llmtrain.ops.power_retention.reference import feature_dim, sym_power_features

__all__ = [
    "RetentionState",
    "default_chunk_size",
    "feature_dim",
    "power_retention",
    "power_retention_step",
    "sym_power_features",
]
