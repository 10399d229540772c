"""Building blocks shared by both models: RMSNorm, the fused RMSNorm+Linear, SwiGLU, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.ops import rmsnorm_linear


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm accumulated in at least float32 (float64 stays float64), returned in x's dtype.

    bf16/fp16 CUDA inputs go to torch's fused kernel as they are (it accumulates in float32 and
    rounds once), with the weight cast to x's dtype and autocast off: a float32 round trip of x
    (two casts forward, two backward) cost the retention-1b step ~14 ms of copies plus float32
    norm traffic on an H100 (docs/perf.md, session 5). Elsewhere x is normalised in float32.
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(acc), (x.shape[-1],), weight.to(acc), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps)


class NormLinear(nn.Module):
    """RMSNorm followed by a bias-free Linear, as one fused op (llmtrain.ops.rmsnorm_linear).

    Every pre-norm projection of the models is one of these, so the normalised activations are never
    written to memory. ``norm_weight`` is the RMSNorm scale, ``weight`` the [out, in] Linear weight.
    """

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.norm_weight = nn.Parameter(torch.ones(in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def normalize(self, x: Tensor) -> Tensor:
        """Only the RMSNorm half, matching the fused op (used where the normalised input is cached)."""
        return _rms_norm(x, self.norm_weight, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm_linear(x, self.norm_weight, self.weight, None, self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, eps={self.eps}"


class SwiGLU(nn.Module):
    """Pre-norm SwiGLU MLP: down(silu(gate(norm x)) * up(norm x)), gate and up as one fused projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-6):
        super().__init__()
        self.gate_up_proj = NormLinear(hidden_size, 2 * intermediate_size, eps)
        self.down_proj = OutputProjection(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rotary_cos_sin(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables [..., dim] for integer positions (any shape), in float32 (or float64) then cast.

    Computed on the fly rather than kept as a buffer: it costs positions x dim/2 work and leaves no
    state for checkpoints or meta-device construction to get wrong.
    """
    acc = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=acc) / dim))
    angles = positions.to(acc)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + dim/2) of x [..., dim] by the given angles (the Llama/NeoX layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class OutputProjection(nn.Linear):
    """A bias-free Linear that writes into the residual stream (attention output, MLP down).

    Only a marker type: the initialiser gives it std / sqrt(2 * layers) (GPT-2's scaled residual
    init), so the residual stream's variance does not grow with depth at initialisation.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
