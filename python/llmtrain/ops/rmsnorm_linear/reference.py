"""Float64 reference for the fused RMSNorm + Linear: y = linear(x * rsqrt(mean(x^2) + eps) * g, W, b)."""

from __future__ import annotations

import torch


def rmsnorm_linear(x, norm_weight, weight, bias=None, eps: float = 1e-6):
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y = (x64 * rstd * norm_weight.double()) @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    return y
