"""``rmsnorm_linear``: y = linear(rms_norm(x, norm_weight, eps), weight, bias), fused.

Registered as ``llmtrain::rmsnorm_linear_fwd`` / ``llmtrain::rmsnorm_linear_bwd`` custom ops with
fake implementations and autograd, so it traces under ``torch.compile``; eager calls take the same
implementations through an autograd.Function (``_eager``: no custom-op dispatch on the host). Native
kernels on CPU (and CUDA when built with nvcc); elsewhere, torch's own rms_norm + linear.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmtrain.ops import _eager, _native


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """x [n, k] -> (y [n, m], rstd [n])."""
    acc = _acc_dtype(x.dtype)
    if not _native.supports(x):
        rstd = torch.rsqrt(x.to(acc).pow(2).mean(-1) + eps)
        xn = (x.to(acc) * rstd[:, None]).to(x.dtype) * norm_weight
        return F.linear(xn, weight, bias), rstd
    y = x.new_empty(x.shape[0], weight.shape[0])
    rstd = x.new_empty(x.shape[0], dtype=acc)
    _native.native().rmsnorm_linear_fwd(
        _native.dl(x), _native.dl(norm_weight), _native.dl(weight), _native.dl(bias), _native.dl(y),
        _native.dl(rstd), eps, _native.stream_of(x))
    return y, rstd


_fwd_op = torch.library.custom_op("llmtrain::rmsnorm_linear_fwd", _forward, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(x, norm_weight, weight, bias, eps):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], dtype=_acc_dtype(x.dtype))


def _backward_impl(x: Tensor, norm_weight: Tensor, weight: Tensor, rstd: Tensor, dy: Tensor, has_bias: bool,
            eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d_norm_weight, d_weight, d_bias); d_bias is empty without a bias."""
    if not _native.supports(x):
        with torch.enable_grad():
            xs, gs, ws = (t.detach().requires_grad_(True) for t in (x, norm_weight, weight))
            xn = (xs.to(rstd.dtype) * rstd[:, None]).to(x.dtype) * gs
            y = F.linear(xn, ws)
            dx, dg, dw = torch.autograd.grad(y, (xs, gs, ws), dy)
        db = dy.sum(0) if has_bias else x.new_empty(0)
        return dx, dg, dw, db
    dxn_given = _cublas_dgrad(x)
    # dxn = dy W from cuBLAS straight into dx; the native backward then turns it into dx in place.
    dx = torch.mm(dy, weight) if dxn_given else torch.empty_like(x)
    dg, dw = torch.empty_like(norm_weight), torch.empty_like(weight)
    db = x.new_empty(weight.shape[0]) if has_bias else None
    _native.native().rmsnorm_linear_bwd(
        _native.dl(x), _native.dl(norm_weight), _native.dl(weight), _native.dl(rstd), _native.dl(dy),
        _native.dl(dx), _native.dl(dg), _native.dl(dw), _native.dl(db), eps, _native.stream_of(x), dxn_given)
    return dx, dg, dw, db if db is not None else x.new_empty(0)


def _cublas_dgrad(x: Tensor) -> bool:
    """Whether the backward's data GEMM dxn = dy W goes to cuBLAS (torch.mm) instead of the
    extension's own GEMM: CUDA 16-bit tensors, unless LLMTRAIN_RMSLIN_DGRAD=native. On an H100 cuBLAS
    ran this NT shape in 161 us against the CUTLASS kernel's 188 (16384 x 2048 -> 2048, session 10)."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    choice = os.environ.get("LLMTRAIN_RMSLIN_DGRAD", "cublas") or "cublas"
    if choice not in ("cublas", "native"):
        raise ValueError(f"LLMTRAIN_RMSLIN_DGRAD={choice!r}: expected 'cublas' or 'native'")
    return choice == "cublas"


_bwd_op = torch.library.custom_op("llmtrain::rmsnorm_linear_bwd", _backward_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(x, norm_weight, weight, rstd, dy, has_bias, eps):
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(weight),
            x.new_empty(weight.shape[0]) if has_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, norm_weight, weight, bias, eps = inputs
    ctx.save_for_backward(x, norm_weight, weight, output[1])
    ctx.has_bias, ctx.eps = bias is not None, eps
    # rstd is an internal output (saved for the backward, never differentiated). Without these two
    # lines autograd materializes a zero gradient for it on every backward: one fill kernel plus its
    # launch gap on the GPU (the FillFunctor<float> of the session-3 profile).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _drstd):
    x, norm_weight, weight, rstd = ctx.saved_tensors
    if dy is None:  # y did not reach the loss (grads are not materialized): no gradient at all
        return None, None, None, None, None
    bwd = _eager.backward_op(ctx, torch.ops.llmtrain.rmsnorm_linear_bwd, _backward_impl)
    dx, dg, dw, db = bwd(x, norm_weight, weight, rstd, dy.contiguous(), ctx.has_bias, ctx.eps)
    return dx, dg, dw, (db if ctx.has_bias else None), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_EagerFunction = _eager.autograd_function("RMSNormLinearFunction", _forward, _setup_context, _backward)


def rmsnorm_linear(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   eps: float = 1e-6) -> Tensor:
    """linear(rms_norm(x) * norm_weight, weight, bias) over the last dim of x (any leading shape)."""
    for name, t in (("x", x), ("norm_weight", norm_weight), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"rmsnorm_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("rmsnorm_linear: x must have at least one dimension")
    k = x.shape[-1]
    if norm_weight.shape != (k,):
        raise ValueError(f"rmsnorm_linear: norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"rmsnorm_linear: weight must be [out_features, {k}], got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"rmsnorm_linear: bias must be [{weight.shape[0]}]")
    cast = _native.autocast_dtype(x)
    if cast is not None and x.is_floating_point():
        x = x.to(cast)
    params = (norm_weight, weight) + ((bias,) if bias is not None else ())
    if any(p.dtype != x.dtype for p in params):
        # Mixed precision (autocast or fp32 master weights with bf16 activations): compute in x's dtype.
        norm_weight, weight = norm_weight.to(x.dtype), weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    if any(p.device != x.device for p in params):
        raise ValueError("rmsnorm_linear: x and the weights are on different devices")
    lead, m = x.shape[:-1], weight.shape[0]
    pad = _out_feature_padding(x, m)
    if pad:
        # Zero rows make y's extra columns zero; sliced off below (their gradient is zero).
        weight = F.pad(weight, (0, 0, 0, pad))
        bias = F.pad(bias, (0, pad)) if bias is not None else None
    fwd = torch.ops.llmtrain.rmsnorm_linear_fwd if _eager.tracing(x) else _EagerFunction.apply
    y, _ = fwd(
        x.reshape(-1, k).contiguous(), norm_weight.contiguous(), weight.contiguous(),
        bias.contiguous() if bias is not None else None, float(eps))
    if pad:
        y = y[:, :m]
    return y.reshape(*lead, m)


def _out_feature_padding(x: Tensor, m: int) -> int:
    """Rows of zeros to append to the weight so the CUDA tensor-core GEMMs can take it: they need
    out_features % 8 == 0 (16-byte rows); otherwise the extension falls back to a SIMT GEMM many
    times slower (e.g. a fused q/k/v/gate projection of 3 * 768 + 12 = 2316 features)."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return 0
    return (-m) % 8
