"""MLX building blocks mirroring llmtrain.models.layers: RMSNorm, the fused RMSNorm+Linear, SwiGLU,
rotary embedding, and bias-free Linears that compute in the input's dtype.

Parameters carry the torch modules' names (``weight``, ``norm_weight``) so the same safetensors load
into either framework. Weights may be kept in float32 while activations run in bfloat16: every layer
casts its weights to the dtype of its input (what torch's autocast does for the torch models), and
the casts' VJPs return float32 gradients to the float32 weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from llmtrain.mlx.ops import rmsnorm_linear


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm in float32, returned in x's dtype (as the torch models' ``_rms_norm``)."""
    return mx.fast.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps).astype(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """A bias-free Linear with a [out, in] weight, computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = mx.zeros((out_features, in_features))

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.astype(x.dtype).T


class OutputProjection(Linear):
    """A Linear that writes into the residual stream (attention output, MLP down); only a marker for
    the initialiser, which scales its std by 1/sqrt(2 * layers) as for the torch models."""


class NormLinear(nn.Module):
    """RMSNorm followed by a bias-free Linear as one fused op (llmtrain.mlx.ops.rmsnorm_linear).

    ``norm_weight`` is the RMSNorm scale, ``weight`` the [out, in] Linear weight.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.norm_weight = mx.ones((in_features,))
        self.weight = mx.zeros((out_features, in_features))

    def normalize(self, x: mx.array) -> mx.array:
        """Only the RMSNorm half (used where the normalised input is cached)."""
        return rms_norm(x, self.norm_weight, self.eps)

    def __call__(self, x: mx.array) -> mx.array:
        return rmsnorm_linear(x, self.norm_weight, self.weight, None, self.eps)


class SwiGLU(nn.Module):
    """Pre-norm SwiGLU MLP: down(silu(gate(norm x)) * up(norm x)), gate and up one fused projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6):
        super().__init__()
        self.gate_up_proj = NormLinear(hidden_size, 2 * intermediate_size, eps)
        self.down_proj = OutputProjection(intermediate_size, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


def rotary_cos_sin(positions: mx.array, dim: int, theta: float, dtype) -> tuple[mx.array, mx.array]:
    """cos and sin tables [..., dim] for integer positions, computed in float32 then cast."""
    inv_freq = 1.0 / (theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
    angles = positions.astype(mx.float32)[..., None] * inv_freq
    angles = mx.concatenate([angles, angles], axis=-1)
    return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate channel pairs (i, i + dim/2) of x [..., dim] (the Llama/NeoX layout)."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def run_checkpointed(layer: nn.Module, hidden: mx.array, *args) -> mx.array:
    """layer(hidden, *args) under mx.checkpoint: its activations are recomputed in the backward pass.

    The layer's parameters go in as explicit inputs (and are swapped in inside), as mx.checkpoint
    differentiates only with respect to its arguments.
    """

    def forward(params, h):
        layer.update(params)
        return layer(h, *args)

    return mx.checkpoint(forward)(layer.trainable_parameters(), hidden)
