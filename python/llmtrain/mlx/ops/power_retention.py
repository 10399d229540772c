"""Gated power retention (deg 2) for MLX: the same function, layouts and state as
``llmtrain.ops.power_retention`` (see its reference.py and docs/design.md).

    y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij,   w_ij = (s q_i . k_j)^2 exp(G_i - G_j),   G = cumsum(log_g)

Each call builds (and caches per configuration) an ``mx.custom_function`` whose forward returns
(y, den[, state, sum_of_keys]) and whose VJP is the chunked backward of the CPU kernel
(csrc/cpu/power_retention.cpp): recompute chunk-start states, carry dS backwards, gate gradient
by homogeneity. Behind it, two implementations of the same algorithm:

- ``metal``: kernels in metal/power_retention_{scan,fwd,bwd,step}.metal (docs/mlx.md maps them
  to threadgroups), with elementwise glue in MLX;
- ``mlx``: the chunked algorithm in MLX ops, materialising phi features per chunk (Linux, CI).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from llmtrain.mlx.ops import _kernels as K


class RetentionState(NamedTuple):
    """Recurrent state per KV head: state [b, hk, D, d], sum_of_keys [b, hk, D], float32."""

    state: mx.array
    sum_of_keys: mx.array


def feature_dim(d: int) -> int:
    return d * (d + 1) // 2


def default_chunk_size(t: int, d: int) -> int:
    """The pure-MLX path's chunk (the result does not depend on it); the Metal kernels use
    ``min(chunk_size, their tile limit)`` (32 tokens at d = 64)."""
    return 64 if d >= 128 else 128


_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


# ---------------------------------------------------------------------------------------------
# Feature map helpers (pure-MLX path)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _feature_tables(d: int):
    a, b = np.triu_indices(d)
    w = np.where(a == b, 1.0, math.sqrt(2.0)).astype(np.float32)
    # symmetric gather map for J_phi^T u: M[x, y] = coef * u[f(min, max)]
    idx = np.zeros((d, d), dtype=np.int32)
    idx[a, b] = np.arange(a.size)
    idx[b, a] = np.arange(a.size)
    coef = np.where(np.eye(d, dtype=bool), 2.0, math.sqrt(2.0)).astype(np.float32)
    return (mx.array(a.astype(np.int32)), mx.array(b.astype(np.int32)), mx.array(w),
            mx.array(idx.reshape(-1)), mx.array(coef.reshape(-1)))


def _phi(x):
    ia, ib, w, _, _ = _feature_tables(x.shape[-1])
    return mx.take(x, ia, axis=-1) * mx.take(x, ib, axis=-1) * w


def _phi_backward(u, x):
    """J_phi(x)^T u over the last dims: u [..., D], x [..., d] -> [..., d]."""
    d = x.shape[-1]
    _, _, _, idx, coef = _feature_tables(d)
    M = (mx.take(u, idx, axis=-1) * coef).reshape(*u.shape[:-1], d, d)
    return (M @ x[..., None])[..., 0]


# ---------------------------------------------------------------------------------------------
# Pure-MLX chunked forward / backward (float32)
# ---------------------------------------------------------------------------------------------


def _chunks(q, k, v, lg, C, scale):
    """Reshape to per-chunk layouts: qs [B,HK,R,NC,C,d] (scaled), k [B,HK,NC,C,d],
    vhat [B,HK,NC,C,E], g [B,HK,NC,C] (within-chunk cumulative gate)."""
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    R = HQ // HK
    NC = -(-T // C)
    pad = NC * C - T
    f32 = mx.float32
    qs = q.astype(f32) * scale
    kk, vv = k.astype(f32), v.astype(f32)
    vhat = mx.concatenate([vv, mx.ones((B, T, HK, 1), f32)], axis=-1)
    g = lg if lg is not None else mx.zeros((B, T, HK), f32)
    if pad:
        qs = mx.pad(qs, [(0, 0), (0, pad), (0, 0), (0, 0)])
        kk = mx.pad(kk, [(0, 0), (0, pad), (0, 0), (0, 0)])
        vhat = mx.pad(vhat, [(0, 0), (0, pad), (0, 0), (0, 0)])
        g = mx.pad(g, [(0, 0), (0, pad), (0, 0)])
    qs = qs.reshape(B, NC, C, HK, R, d).transpose(0, 3, 4, 1, 2, 5)
    kk = kk.reshape(B, NC, C, HK, d).transpose(0, 3, 1, 2, 4)
    vhat = vhat.reshape(B, NC, C, HK, d + 1).transpose(0, 3, 1, 2, 4)
    g = mx.cumsum(g.reshape(B, NC, C, HK).transpose(0, 3, 1, 2), axis=-1)
    return qs, kk, vhat, g


def _unchunk_q(x, T):
    """[B,HK,R,NC,C,X] -> [B,T,HQ,X]."""
    B, HK, R, NC, C, X = x.shape
    return x.transpose(0, 3, 4, 1, 2, 5).reshape(B, NC * C, HK * R, X)[:, :T]


def _unchunk_kv(x, T):
    """[B,HK,NC,C,X] -> [B,T,HK,X]."""
    B, HK, NC, C, X = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, NC * C, HK, X)[:, :T]


def _intra(qs, kk, g):
    """Scores a_ij [B,HK,R,NC,C,C] and masked decays e_ij [B,HK,1,NC,C,C]."""
    C = kk.shape[-2]
    a = qs @ mx.expand_dims(kk.swapaxes(-1, -2), 2)
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    diff = g[..., :, None] - g[..., None, :]
    e = mx.exp(mx.where(causal, diff, -mx.inf))
    return a, mx.expand_dims(e, 2)


def _states(kk, vhat, g, S0):
    """State entering each chunk, and the final one: [B,HK,NC+1,D,E]."""
    NC = kk.shape[2]
    Gt = g[..., -1]                                              # [B,HK,NC]
    U = _phi(kk) * mx.exp(Gt[..., None] - g)[..., None]          # [B,HK,NC,C,D]
    contrib = U.swapaxes(-1, -2) @ vhat                          # [B,HK,NC,D,E]
    states = [S0]
    for n in range(NC):
        states.append(mx.exp(Gt[..., n])[..., None, None] * states[-1] + contrib[:, :, n])
    return mx.stack(states, axis=2)


def _mlx_forward(q, k, v, lg, S0, scale, C):
    B, T, HQ, d = q.shape
    qs, kk, vhat, g = _chunks(q, k, v, lg, C, scale)
    a, e = _intra(qs, kk, g)
    num = ((a * a) * e) @ mx.expand_dims(vhat, 2)                # [B,HK,R,NC,C,E]
    states = _states(kk, vhat, g, S0)
    pq = _phi(qs) * mx.exp(mx.expand_dims(g, 2))[..., None]      # [B,HK,R,NC,C,D]
    num = num + pq @ mx.expand_dims(states[:, :, :-1], 2)
    num = _unchunk_q(num, T)
    den = num[..., d]
    y = num[..., :d] / den[..., None]
    return y.astype(q.dtype), den, states[:, :, -1]


def _ghat(dy, y, den):
    dy = dy.astype(mx.float32)
    inv = 1.0 / den[..., None]
    return mx.concatenate([dy * inv, -(dy * y.astype(mx.float32)).sum(-1, keepdims=True) * inv], axis=-1)


def _mlx_backward(q, k, v, lg, S0, dy, y, den, dS_final, scale, C):
    """Gradients (dq, dk, dv, dG, dS0) in float32; dG per position (before the reverse cumsum)."""
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    qs, kk, vhat, g = _chunks(q, k, v, lg, C, scale)
    NC, Cc = kk.shape[2], kk.shape[3]
    gh = _ghat(dy, y, den)
    pad = NC * Cc - T
    if pad:
        gh = mx.pad(gh, [(0, 0), (0, pad), (0, 0), (0, 0)])
    R = HQ // HK
    gh = gh.reshape(B, NC, Cc, HK, R, d + 1).transpose(0, 3, 4, 1, 2, 5)   # [B,HK,R,NC,C,E]
    a, e = _intra(qs, kk, g)
    vh = mx.expand_dims(vhat, 2)
    dw = gh @ vh.swapaxes(-1, -2)
    da = 2.0 * a * e * dw
    dqs = da @ mx.expand_dims(kk, 2)
    dk = (da.swapaxes(-1, -2) @ qs).sum(2)
    dvhat = (((a * a) * e).swapaxes(-1, -2) @ gh).sum(2)
    states = _states(kk, vhat, g, S0)                            # [B,HK,NC+1,D,E]
    eg = mx.exp(mx.expand_dims(g, 2))[..., None]                 # [B,HK,1,NC,C,1]
    u = eg * (gh @ mx.expand_dims(states[:, :, :-1], 2).swapaxes(-1, -2))
    dqs = dqs + _phi_backward(u, qs)
    # dS carried backwards: dS_n = exp(Gt_n) dS_{n+1} + sum_heads (exp(g) phi(qs))^T ghat
    P = ((_phi(qs) * eg).swapaxes(-1, -2) @ gh).sum(2)           # [B,HK,NC,D,E]
    Gt = g[..., -1]
    dS = [dS_final]
    for n in range(NC - 1, -1, -1):
        dS.append(mx.exp(Gt[..., n])[..., None, None] * dS[-1] + P[:, :, n])
    dS = mx.stack(dS[::-1], axis=2)                               # dS[n] = d(state entering chunk n)
    leave = dS[:, :, 1:]
    cj = mx.exp(Gt[..., None] - g)[..., None]                    # [B,HK,NC,C,1]
    dvhat = dvhat + (_phi(kk) * cj) @ leave
    uk = cj * (vhat @ leave.swapaxes(-1, -2))
    dk = dk + _phi_backward(uk, kk)
    dq = _unchunk_q(dqs, T) * scale
    dk = _unchunk_kv(dk, T)
    dv = _unchunk_kv(dvhat, T)[..., :d]
    qdq = (_unchunk_q(dqs, T) * _unchunk_q(qs, T)).sum(-1).reshape(B, T, HK, R).sum(-1)
    dG = (qdq - (dk * k.astype(mx.float32)).sum(-1)) / 2.0
    return dq, dk, dv, dG, dS[:, :, 0], states[:, :, -1]


def _mlx_step(q, k, v, lg, S0, scale):
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    R = HQ // HK
    S = S0
    ys, dens = [], []
    f32 = mx.float32
    for t in range(T):
        kt, vt = k[:, t].astype(f32), v[:, t].astype(f32)
        vhat = mx.concatenate([vt, mx.ones((B, HK, 1), f32)], axis=-1)
        upd = _phi(kt)[..., None] * vhat[..., None, :]
        S = (S * mx.exp(lg[:, t])[..., None, None] + upd) if lg is not None else S + upd
        pq = _phi(q[:, t].astype(f32) * scale).reshape(B, HK, R, -1)
        nd = (pq[..., None, :] @ mx.expand_dims(S, 2))[..., 0, :]   # [B,HK,R,E]
        nd = nd.reshape(B, HQ, d + 1)
        dens.append(nd[..., d])
        ys.append(nd[..., :d] / nd[..., d:])
    return mx.stack(ys, 1).astype(q.dtype), mx.stack(dens, 1), S


# ---------------------------------------------------------------------------------------------
# Metal path
# ---------------------------------------------------------------------------------------------


def _dummy():
    return mx.zeros((1,), mx.float32)


def _within_chunk_gate(lg, C):
    B, T, HK = lg.shape
    NC = -(-T // C)
    pad = NC * C - T
    g = mx.pad(lg, [(0, 0), (0, pad), (0, 0)]) if pad else lg
    return mx.cumsum(g.reshape(B, NC, C, HK), axis=2).reshape(B, NC * C, HK)[:, :T]


def _metal_states(k, v, lg, S0, C, need):
    B, T, HK, d = k.shape
    if not need:
        return _dummy()
    vhat = mx.concatenate([v.astype(mx.float32), mx.ones((B, T, HK, 1), mx.float32)], axis=-1)
    spec = K.retention_scan_spec(B=B, T=T, HK=HK, HX=HK, D=d, C=C, reverse=False, gated=lg is not None,
                                 xscale=1.0, dtype=k.dtype)
    return K.run(spec, [k, vhat, lg if lg is not None else _dummy(), S0])[0]


def _metal_forward(q, k, v, lg, S0, has_init, want_state, scale, C):
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    NC = -(-T // C)
    need = has_init or want_state or NC > 1
    states = _metal_states(k, v, lg, S0, C, need)
    gc = _within_chunk_gate(lg, C) if lg is not None else _dummy()
    spec = K.retention_fwd_spec(B=B, T=T, HQ=HQ, HK=HK, D=d, C=C, gated=lg is not None, first_state=has_init,
                                scale=scale, dtype=q.dtype)
    y, den = K.run(spec, [q, k, v, gc, states if (has_init or NC > 1) else _dummy()])
    final = states[:, :, NC] if want_state else None
    return y, den, final


def _metal_backward(q, k, v, lg, S0, has_init, dy, y, den, dS_final, scale, C):
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    NC = -(-T // C)
    gated = lg is not None
    final_ds = dS_final is not None
    need_states = has_init or NC > 1 or final_ds
    states = _metal_states(k, v, lg, S0, C, need_states)
    gh = _ghat(dy, y, den)
    need_dstates = NC > 1 or has_init or final_ds
    if need_dstates:
        init = dS_final if final_ds else mx.zeros(S0.shape, mx.float32)
        spec = K.retention_scan_spec(B=B, T=T, HK=HK, HX=HQ, D=d, C=C, reverse=True, gated=gated,
                                     xscale=scale, dtype=q.dtype)
        dstates = K.run(spec, [q, gh, lg if gated else _dummy(), init])[0]
    else:
        dstates = _dummy()
    gc = _within_chunk_gate(lg, C) if gated else _dummy()
    spec = K.retention_bwd_spec(B=B, T=T, HQ=HQ, HK=HK, D=d, C=C, gated=gated, first_state=has_init,
                                final_ds=final_ds, scale=scale, dtype=q.dtype)
    dq, dk, dv = K.run(spec, [q, k, v, gc, gh, states if need_states else _dummy(), dstates])
    R = HQ // HK
    qdq = (dq * q.astype(mx.float32)).sum(-1).reshape(B, T, HK, R).sum(-1)
    dG = (qdq - (dk * k.astype(mx.float32)).sum(-1)) / 2.0
    dS0 = dstates[:, :, 0] if need_dstates else mx.zeros(S0.shape, mx.float32)
    final = states[:, :, NC] if final_ds else None
    return dq, dk, dv, dG, dS0, final


def _metal_step(q, k, v, lg, S0, scale):
    B, T, HQ, d = q.shape
    HK = k.shape[2]
    spec = K.retention_step_spec(B=B, T=T, HQ=HQ, HK=HK, D=d, gated=lg is not None, scale=scale, dtype=q.dtype)
    S, numden = K.run(spec, [q, k, v, lg if lg is not None else _dummy(), S0])
    den = numden[..., d]
    return (numden[..., :d] / den[..., None]).astype(q.dtype), den, S


# ---------------------------------------------------------------------------------------------
# custom_function per configuration
# ---------------------------------------------------------------------------------------------


def _fuse(S, z):
    return mx.concatenate([S.astype(mx.float32), z.astype(mx.float32)[..., None]], axis=-1)


def _split(F):
    return F[..., :-1], F[..., -1]


@functools.lru_cache(maxsize=128)
def _retention_fn(impl: str, gated: bool, has_init: bool, want_state: bool, step: bool, scale: float, C: int):
    """custom_function(q, k, v, [log_g], [S0, z0]) -> (y, den[, S, z])."""

    def unpack(args):
        q, k, v = args[:3]
        i = 3
        lg = None
        if gated:
            lg, i = args[i].astype(mx.float32), i + 1
        B, T, HQ, d = q.shape
        HK = k.shape[2]
        S0 = _fuse(args[i], args[i + 1]) if has_init else mx.zeros((B, HK, feature_dim(d), d + 1), mx.float32)
        return q, k, v, lg, S0

    @mx.custom_function
    def f(*args):
        q, k, v, lg, S0 = unpack(args)
        if step:
            y, den, final = (_metal_step if impl == "metal" else _mlx_step)(q, k, v, lg, S0, scale)
        elif impl == "metal":
            y, den, final = _metal_forward(q, k, v, lg, S0, has_init, want_state, scale, C)
        else:
            y, den, final = _mlx_forward(q, k, v, lg, S0, scale, C)
        if want_state:
            return (y, den) + _split(final)
        return y, den

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        q, k, v, lg, S0 = unpack(primals)
        dy = cotangents[0]
        y, den = outputs[0], outputs[1]
        dS_final = _fuse(cotangents[2], cotangents[3]) if want_state else None
        T = q.shape[1]
        Cb = max(T, 1) if step else C  # the step's gradient: one chunk from the given state
        if impl == "metal":
            Cb = K.metal_chunk(T, q.shape[3], Cb)
            dq, dk, dv, dG, dS0, final = _metal_backward(q, k, v, lg, S0, has_init, dy, y, den, dS_final, scale, Cb)
        else:
            dS_in = dS_final if dS_final is not None else mx.zeros(S0.shape, mx.float32)
            dq, dk, dv, dG, dS0, final = _mlx_backward(q, k, v, lg, S0, dy, y, den, dS_in, scale, Cb)
            if dS_final is None:
                final = None
        grads = [dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)]
        if gated:
            if final is not None and T > 0:
                last = (dS_final * final).sum((-2, -1))          # <dS_T, S_T> at the last position
                dG = dG + mx.concatenate([mx.zeros((dG.shape[0], T - 1, dG.shape[2]), mx.float32),
                                          last[:, None, :]], axis=1)
            grads.append(mx.cumsum(dG, axis=1, reverse=True).astype(primals[3].dtype))
        if has_init:
            i = 4 if gated else 3
            dS, dz = _split(dS0)
            grads += [dS.astype(primals[i].dtype), dz.astype(primals[i + 1].dtype)]
        return tuple(grads)

    return f


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check(q, k, v, log_g, name):
    for nm, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, mx.array):
            raise TypeError(f"{name}: {nm} must be an mx.array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name}: {nm} must be [batch, time, heads, dim], got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"{name}: float32, float16 or bfloat16 inputs required, got {q.dtype}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d or k.shape != v.shape:
        raise ValueError(f"{name}: k and v must be [{b}, {t}, kv_heads, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] == 0 or hq % k.shape[2] != 0:
        raise ValueError(f"{name}: mismatched heads: q has {hq} heads, not a multiple of k/v's {k.shape[2]}")
    if log_g is not None and (not isinstance(log_g, mx.array) or tuple(log_g.shape) != (b, t, k.shape[2])):
        shape = tuple(log_g.shape) if isinstance(log_g, mx.array) else type(log_g).__name__
        raise ValueError(f"{name}: log_g must be [{b}, {t}, {k.shape[2]}], got {shape}")


def _check_state(state, q, k, name):
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name}: the state must be a RetentionState (state, sum_of_keys) tuple")
    b, hk, d = q.shape[0], k.shape[2], q.shape[3]
    D = feature_dim(d)
    S, z = state
    if tuple(S.shape) != (b, hk, D, d) or tuple(z.shape) != (b, hk, D):
        raise ValueError(f"{name}: expected state [{b}, {hk}, {D}, {d}] and sum_of_keys [{b}, {hk}, {D}], "
                         f"got {tuple(S.shape)} and {tuple(z.shape)}")
    return S.astype(mx.float32), z.astype(mx.float32)


def _scale(scale, d, name):
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"{name}: scale must be finite and non-zero, got {scale}")
    return scale


def power_retention(q: mx.array, k: mx.array, v: mx.array, log_g: Optional[mx.array] = None, *,
                    scale: Optional[float] = None, chunk_size: Optional[int] = None,
                    initial_state: Optional[RetentionState] = None, return_state: bool = False):
    """Gated power retention (deg 2), differentiable with mx.grad / mx.vjp / nn.value_and_grad.

    q [batch, time, heads, dim]; k, v [batch, time, kv_heads, dim] (GQA: query head h reads kv
    head h // (heads // kv_heads)); log_g [batch, time, kv_heads] (<= 0); scale defaults to
    1/sqrt(dim); chunk_size only changes rounding; initial_state / return_state: RetentionState
    (state [b, hk, D, d], sum_of_keys [b, hk, D], float32, D = d(d+1)/2).
    Returns y in q's dtype, or (y, RetentionState) with return_state.
    """
    name = "power_retention"
    _check(q, k, v, log_g, name)
    b, t, hq, d = q.shape
    scale = _scale(scale, d, name)
    if chunk_size is None:
        chunk_size = default_chunk_size(t, d)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
    impl = K.backend()
    C = K.metal_chunk(t, d, chunk_size) if impl == "metal" else max(1, min(chunk_size, max(t, 1)))
    if t == 0:
        y = mx.zeros(q.shape, q.dtype)
        if not return_state:
            return y
        st = initial_state if initial_state is not None else RetentionState(
            mx.zeros((b, k.shape[2], feature_dim(d), d)), mx.zeros((b, k.shape[2], feature_dim(d))))
        return y, RetentionState(*st)
    args = [q, k, v]
    if log_g is not None:
        args.append(log_g)
    if initial_state is not None:
        args += list(_check_state(initial_state, q, k, name))
    fn = _retention_fn(impl, log_g is not None, initial_state is not None, bool(return_state), False, scale, C)
    out = fn(*args)
    if return_state:
        return out[0], RetentionState(out[2], out[3])
    return out[0]


def power_retention_step(q: mx.array, k: mx.array, v: mx.array, log_g: Optional[mx.array] = None, *,
                         state: Optional[RetentionState] = None, scale: Optional[float] = None):
    """Advance a RetentionState by the given tokens (usually one) in the recurrent form and return
    (y, new_state). Cost per token is independent of the context length. Differentiable: its VJP
    is the chunked backward from the given state (one chunk). MLX arrays are immutable, so there
    is no in-place variant; the returned state replaces the old one."""
    name = "power_retention_step"
    _check(q, k, v, log_g, name)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    scale = _scale(scale, d, name)
    if state is None:
        D = feature_dim(d)
        state = RetentionState(mx.zeros((b, hk, D, d), mx.float32), mx.zeros((b, hk, D), mx.float32))
    S, z = _check_state(state, q, k, name)
    if t == 0:
        return mx.zeros(q.shape, q.dtype), RetentionState(S, z)
    args = [q, k, v] + ([log_g] if log_g is not None else []) + [S, z]
    fn = _retention_fn(K.backend(), log_g is not None, True, True, True, scale, max(t, 1))
    out = fn(*args)
    return out[0], RetentionState(out[2], out[3])
