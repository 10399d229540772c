"""Fused RMSNorm + Linear."""

from llmtrain.ops.rmsnorm_linear.op import rmsnorm_linear

__all__ = ["rmsnorm_linear"]
