"""Fused RMSNorm + Linear for MLX: y = linear(x * rsqrt(mean(x^2) + eps) * norm_weight, weight, bias),
the same contract as ``llmtrain.ops.rmsnorm_linear`` (any leading shape; weights of another dtype
are cast to x's). An ``mx.custom_function`` returning (y, rstd) with the CPU kernel's backward:

    dxn = dy W,  dW = dy^T xn,  db = sum_rows dy,  dg = sum_rows dxn * x * rstd,
    dx = rstd (dxn * g) - rstd^3 / K * x * sum_c(dxn g x)

Metal path: metal/rmsnorm_rstd.metal, metal/rmsnorm_linear_gemm.metal (three GEMM modes, the norm
applied while staging tiles), metal/rmsnorm_linear_bwd_rows.metal; pure-MLX path otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx

from llmtrain.mlx.ops import _kernels as K


def _mlx_forward(x, g, w, b, eps):
    xf = x.astype(mx.float32)
    rstd = mx.rsqrt((xf * xf).mean(-1) + eps)
    xn = (xf * rstd[:, None]).astype(x.dtype) * g
    y = xn @ w.T
    if b is not None:
        y = y + b
    return y, rstd


def _mlx_backward(x, g, w, rstd, dy):
    f32 = mx.float32
    xf, gf, dyf = x.astype(f32), g.astype(f32), dy.astype(f32)
    xn = xf * rstd[:, None] * gf
    dxn = dyf @ w.astype(f32)
    dw = dyf.T @ xn
    dg = (dxn * xf * rstd[:, None]).sum(0)
    s = (dxn * gf * xf).sum(-1, keepdims=True)
    r = rstd[:, None]
    dx = r * dxn * gf - r * r * r / x.shape[-1] * xf * s
    return dx, dg, dw, dxn


def _metal_forward(x, g, w, b, eps):
    N, Kd = x.shape
    M = w.shape[0]
    rstd = K.run(K.rms_rstd_spec(N=N, K=Kd, eps=eps, dtype=x.dtype), [x])[0]
    inputs = [x, g, w, rstd] + ([b] if b is not None else [])
    y = K.run(K.rms_gemm_spec(mode=0, N=N, K=Kd, M=M, has_bias=b is not None, dtype=x.dtype), inputs)[0]
    return y, rstd


def _metal_backward(x, g, w, rstd, dy):
    N, Kd = x.shape
    M = w.shape[0]
    dxn = K.run(K.rms_gemm_spec(mode=1, N=N, K=Kd, M=M, has_bias=False, dtype=x.dtype), [dy, w])[0]
    dw = K.run(K.rms_gemm_spec(mode=2, N=N, K=Kd, M=M, has_bias=False, dtype=x.dtype), [dy, x, g, rstd])[0]
    dx = K.run(K.rms_bwd_rows_spec(N=N, K=Kd, dtype=x.dtype), [x, g, rstd, dxn])[0]
    dg = (dxn * x.astype(mx.float32) * rstd[:, None]).sum(0)
    return dx, dg, dw, dxn


@functools.lru_cache(maxsize=64)
def _rmsnorm_linear_fn(impl: str, has_bias: bool, eps: float):
    fwd, bwd = (_metal_forward, _metal_backward) if impl == "metal" else (_mlx_forward, _mlx_backward)

    @mx.custom_function
    def f(*args):
        x, g, w = args[:3]
        return fwd(x, g, w, args[3] if has_bias else None, eps)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, g, w = primals[:3]
        dy = cotangents[0]
        dx, dg, dw, _ = bwd(x, g, w, outputs[1], dy)
        grads = (dx.astype(x.dtype), dg.astype(g.dtype), dw.astype(w.dtype))
        if has_bias:
            grads += (dy.astype(mx.float32).sum(0).astype(primals[3].dtype),)
        return grads

    return f


def rmsnorm_linear(x: mx.array, norm_weight: mx.array, weight: mx.array, bias: Optional[mx.array] = None,
                   eps: float = 1e-6) -> mx.array:
    """linear(rms_norm(x) * norm_weight, weight, bias) over the last dim of x (any leading shape)."""
    for name, t in (("x", x), ("norm_weight", norm_weight), ("weight", weight)):
        if not isinstance(t, mx.array):
            raise TypeError(f"rmsnorm_linear: {name} must be an mx.array, got {type(t).__name__}")
    if x.ndim < 1:
        raise ValueError("rmsnorm_linear: x must have at least one dimension")
    k = x.shape[-1]
    if tuple(norm_weight.shape) != (k,):
        raise ValueError(f"rmsnorm_linear: norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    if weight.ndim != 2 or weight.shape[1] != k:
        raise ValueError(f"rmsnorm_linear: weight must be [out_features, {k}], got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, mx.array) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"rmsnorm_linear: bias must be [{weight.shape[0]}]")
    if x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        raise TypeError(f"rmsnorm_linear: float32, float16 or bfloat16 x required, got {x.dtype}")
    norm_weight, weight = norm_weight.astype(x.dtype), weight.astype(x.dtype)
    bias = bias.astype(x.dtype) if bias is not None else None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return mx.zeros((*lead, weight.shape[0]), x.dtype)
    args = [x2, norm_weight, weight] + ([bias] if bias is not None else [])
    y = _rmsnorm_linear_fn(K.backend(), bias is not None, float(eps))(*args)[0]
    return y.reshape(*lead, weight.shape[0])
