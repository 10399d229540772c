"""``power_retention``: the public op, its torch.library registration and autograd.

The forward and backward are registered as custom ops (``llmtrain::power_retention_fwd`` and
``llmtrain::power_retention_bwd``) with fake implementations, so the op traces under
``torch.compile``; the backward is wired with ``register_autograd``. On CPU, and on CUDA when the
extension was built with nvcc, the native kernels run; on any other device (or a CUDA build
without kernels) a chunked torch implementation in float32 computes the same function.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from llmtrain.ops import _eager, _native
from llmtrain.ops.power_retention import reference

_DEG = 2  # the degree the kernels implement


class RetentionState(NamedTuple):
    """Recurrent state of one sequence batch, per KV head.

    state: [batch, kv_heads, D, dim], sum_of_keys: [batch, kv_heads, D], D = dim*(dim+1)/2,
    float32 (float64 for float64 inputs).
    """

    state: Tensor
    sum_of_keys: Tensor


def _wide_local_scan(device: Optional[torch.device] = None) -> bool:
    """Whether chunk 512 is the d = 64 default on this CUDA device (None: the current one): where v20's
    512-row LOCAL scan was measured faster, Hopper (sm_90). Elsewhere the kernel may not get its 143 KB
    of shared memory (sm_86 / 89 / 120 allow 99 KB a block) or was not measured: chunk 256."""
    if not torch.cuda.is_available():
        return True  # a CUDA-free estimate (bench FLOP counts): the H100 policy
    return torch.cuda.get_device_capability(device)[0] == 9


def default_chunk_size(t: int, d: int, device_type: str = "cpu", group: int = 1,
                       device: Optional[torch.device] = None) -> int:
    """Chunk size per sequence length and head dim (the result does not depend on it); group: query
    heads per key/value head (GQA); device: the CUDA device (None: the current one).

    Within a chunk a token costs ~chunk*d multiply-adds (quadratic form); crossing chunks costs
    ~2*D*(d+1) per token (state update and query). On the CPU, where both run at the same rate,
    a whole short sequence in one chunk is cheapest; long ones use 512-token chunks.
    """
    if device_type == "cuda":
        # The CUDA kernels round to a multiple of 128 (at most 1024; 8192 from v7 on) and cap it at
        # the sequence. v7: a sequence up to single_chunk_max(d) runs as one chunk, the quadratic
        # form with no states at all (fewer FLOPs than the state update + query below ~2 D (d+1) / d
        # tokens). Longer ones: larger chunks halve the bf16 state traffic, smaller ones the
        # intra-chunk work. H100 sweep (docs/perf.md, 2026-11-23): d = 64 fwd+bwd within 5% for
        # 256/512 (1024 is 13% slower at 64K); d = 128: 1024 is 1-22% faster than 512.
        if t <= single_chunk_max(d):
            return max(1, t)
        if d == 64 and _cuda_generation() >= 20 and _wide_local_scan(device):
            # v20's LOCAL scan stages up to 512 token rows (group x chunk in its reverse pass): chunk
            # 512 halves the state traffic of chunk 256, fwd+bwd -3% at 8K and -4% at 64K (H100,
            # docs/perf.md session 17). Under GQA, 256 keeps the reverse pass on that kernel at 2:1.
            return 512 if group == 1 else 256
        return 128 if d <= 32 else (256 if d <= 64 else 1024)
    return max(1, t) if t <= 1024 else 512


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace_tensor(q: Tensor, k: Tensor, chunk_size: int, which: int) -> Optional[Tensor]:
    """Scratch for the CUDA kernels (bf16 chunk states etc.) from torch's caching allocator; None
    for CPU tensors or when none is needed."""
    if q.device.type != "cuda":
        return None
    b, t, hq, d = q.shape
    n = _native.native().power_retention_workspace_size(b, t, hq, k.shape[2], d, chunk_size, which)
    return torch.empty(n, dtype=torch.uint8, device=q.device) if n > 0 else None


def _workspace(q: Tensor, k: Tensor, chunk_size: int, which: int) -> dict:
    """Keyword arguments carrying the CUDA scratch (see _workspace_tensor); empty for CPU tensors."""
    ws = _workspace_tensor(q, k, chunk_size, which)
    return {"workspace": _native.dl(ws)} if ws is not None else {}


# The CUDA kernel generation that runs when LLMTRAIN_RETENTION_KERNEL is unset (kDefaultVersion in
# csrc/cuda/power_retention.cu; keep in step).
DEFAULT_CUDA_KERNEL = "v20"
# The longest sequence (per head dim) that default_chunk_size runs as a single chunk, by generation.
# v7 .. v9 (H100, fwd+bwd, 65,536 tokens x 8 heads, docs/perf.md, session 5): d = 64 one chunk 6.5 ms
# vs chunk 256 7.8 at t = 2048, but 11.9 vs 8.4 at 4096; d = 128 16.9 / 29.6 / 52.9 ms vs 58.5 / 66.8
# / 71.4 at 2K / 4K / 8K; d = 32 not measured, so never (its chunk-128 default stands).
SINGLE_CHUNK_MAX_V7 = {32: 0, 64: 2048, 128: 8192}
# v10, the FlashAttention-style one-chunk kernels (H100, fwd+bwd, same tokens, docs/perf.md session 6):
# d = 32 one chunk 1.60 ms vs chunk 128 2.33 at 1K, 2.61 vs 2.42 at 2K; d = 64 3.79 vs 7.82 (c256)
# at 2K, 6.61 vs 8.21 at 4K, 12.4 vs 8.4 at 8K; d = 128 25.3 vs 72.6 (c1024) at 8K.
SINGLE_CHUNK_MAX = {32: 1024, 64: 4096, 128: 8192}


def single_chunk_max(d: int) -> int:
    """The longest t that the CUDA default runs as one chunk for head dim d (0: never)."""
    gen = _cuda_generation()
    table = SINGLE_CHUNK_MAX if gen >= 10 else SINGLE_CHUNK_MAX_V7 if gen >= 7 else {}
    return table.get(d, 0)


def _cuda_generation() -> int:
    """The CUDA kernel generation in effect (LLMTRAIN_RETENTION_KERNEL, else the default), as a number."""
    name = os.environ.get("LLMTRAIN_RETENTION_KERNEL") or DEFAULT_CUDA_KERNEL
    return int(name[1:]) if name[:1] == "v" and name[1:].isdigit() else 0


def _cuda_chunk_count(t: int, chunk_size: int) -> int:
    """Chunks the CUDA kernels split t tokens into (their rounding of chunk_size: retention_cuda_chunk)."""
    cap = 8192 if _cuda_generation() >= 7 else 1024
    c = min(max((chunk_size + 127) // 128 * 128, 128), cap, max((t + 127) // 128 * 128, 128))
    return max(1, -(-t // c))


def _keep_states(q: Tensor) -> bool:
    """Kernels v3 and later (LLMTRAIN_RETENTION_KERNEL; DEFAULT_CUDA_KERNEL when unset; CUDA): keep the forward's bf16 chunk
    states (its workspace, ~1.2 KB per token and KV head at d = 64) for the backward instead of
    recomputing them. Costs that memory from forward to backward; LLMTRAIN_RETENTION_SAVE_STATES=0
    opts out."""
    kernel = os.environ.get("LLMTRAIN_RETENTION_KERNEL") or DEFAULT_CUDA_KERNEL
    return (q.device.type == "cuda" and kernel not in ("v1", "v2")
            and os.environ.get("LLMTRAIN_RETENTION_SAVE_STATES", "1") != "0")


def _all_finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def _forward(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], s0: Optional[Tensor], z0: Optional[Tensor],
    deg: int, scale: float, chunk_size: int, need_state: bool, keep_states: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, state, sum_of_keys, saved); the state tensors are empty unless need_state.
    saved: with keep_states on CUDA, the forward's workspace (uint8; its bf16 chunk states come
    first) for power_retention_bwd; otherwise empty."""
    b, t, hq, d = q.shape
    hk = k.shape[2]
    D = reference.feature_dim(d, deg)
    acc = _acc_dtype(q.dtype)
    no_saved = q.new_empty(0, dtype=torch.uint8)
    if not _native.supports(q):
        y, S, z = _torch_forward(q, k, v, log_g, s0, z0, deg, scale, chunk_size)
        if not need_state:
            S, z = q.new_empty(0, dtype=acc), q.new_empty(0, dtype=acc)
        return y, S, z, no_saved
    y = torch.empty_like(q)
    shape_S, shape_z = ((b, hk, D, d), (b, hk, D)) if need_state else ((0,), (0,))
    S = torch.empty(shape_S, dtype=acc, device=q.device)
    z = torch.empty(shape_z, dtype=acc, device=q.device)
    ws = _workspace_tensor(q, k, chunk_size, _fwd_workspace_kind(t, chunk_size, s0, need_state, keep_states))
    bad = _native.native().power_retention_fwd(
        _native.dl(q), _native.dl(k), _native.dl(v), _native.dl(log_g), _native.dl(s0), _native.dl(z0),
        _native.dl(y), _native.dl(S) if need_state else None, _native.dl(z) if need_state else None,
        deg, scale, chunk_size, _native.stream_of(q), **({"workspace": _native.dl(ws)} if ws is not None else {}))
    if bad > 0 and _all_finite(q, k, v, log_g, s0, z0):  # NaN in, NaN out; finite in, NaN out is an error
        raise FloatingPointError(
            f"power_retention: {bad} non-finite outputs. The inputs overflow {acc} arithmetic: "
            "|scale * q.k|^2 too large, or log_g > 0 summing to a huge growth factor. Normalise q/k "
            "(e.g. RMSNorm) and keep log_g <= 0 (logsigmoid of a gate).")
    keep = keep_states and ws is not None
    return y, S, z, ws if keep else no_saved


_fwd_op = torch.library.custom_op("llmtrain::power_retention_fwd", _forward, mutates_args=())


def _fwd_workspace_kind(t: int, chunk_size: int, s0: Optional[Tensor], need_state: bool,
                        keep_states: bool = False) -> int:
    """The forward's workspace: 4 (one chunk, no state in or out: no chunk states, only the gate sums
    and, from v9 on, the fp32 y and 1 / den its backward reads), 5 (v11 and later, kept for the
    backward: the chunk states, then the same fp32 y and 1 / den, 260 bytes per token and head at
    d = 64, which spare the backward chunk_out's ghat pass) or 0 (the general one)."""
    if s0 is None and not need_state and _cuda_chunk_count(t, chunk_size) == 1:
        return 4
    return 5 if keep_states and _cuda_generation() >= 11 else 0


def _saved_bytes(q, k, s0, chunk_size, need_state, keep_states) -> int:
    if not (keep_states and q.device.type == "cuda" and _native.has_cuda_kernels()):
        return 0
    b, t, hq, d = (int(x) for x in q.shape)  # a size from the kernels' plan: specialises under dynamic shapes
    which = _fwd_workspace_kind(t, chunk_size, s0, need_state, keep_states)
    return int(_native.native().power_retention_workspace_size(b, t, hq, int(k.shape[2]), d, chunk_size, which))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, log_g, s0, z0, deg, scale, chunk_size, need_state, keep_states=False):
    b, t, hq, d = q.shape
    hk = k.shape[2]
    D = reference.feature_dim(d, deg)
    acc = _acc_dtype(q.dtype)
    shape_S, shape_z = ((b, hk, D, d), (b, hk, D)) if need_state else ((0,), (0,))
    return (torch.empty_like(q), q.new_empty(shape_S, dtype=acc), q.new_empty(shape_z, dtype=acc),
            q.new_empty(_saved_bytes(q, k, s0, chunk_size, need_state, keep_states), dtype=torch.uint8))


def _backward_impl(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], s0: Optional[Tensor], z0: Optional[Tensor],
    dy: Tensor, ds: Optional[Tensor], dz: Optional[Tensor], deg: int, scale: float, chunk_size: int,
    saved: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dlog_g, ds0, dz0); the last three are empty when not applicable.
    saved: the forward's kept workspace (v3 and later, CUDA) or None/empty: recompute the chunk states."""
    if not _native.supports(q):
        return _torch_backward(q, k, v, log_g, s0, z0, dy, ds, dz, deg, scale, chunk_size)
    # <dS_T, S_T> (gated, gradient of the final state) needs the recomputed walk: no saved states then
    use_saved = (saved is not None and saved.numel() > 0 and q.device.type == "cuda"
                 and not (log_g is not None and (ds is not None or dz is not None)))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dlog_g = torch.empty_like(log_g) if log_g is not None else None
    ds0 = torch.empty_like(s0) if s0 is not None else None
    dz0 = torch.empty_like(z0) if z0 is not None else None
    _native.native().power_retention_bwd(
        _native.dl(q), _native.dl(k), _native.dl(v), _native.dl(log_g), _native.dl(s0), _native.dl(z0),
        _native.dl(dy), _native.dl(ds), _native.dl(dz), _native.dl(dq), _native.dl(dk), _native.dl(dv),
        _native.dl(dlog_g), _native.dl(ds0), _native.dl(dz0), deg, scale, chunk_size, _native.stream_of(q),
        **_workspace(q, k, chunk_size, 3 if use_saved else 1),
        **({"saved_states": _native.dl(saved)} if use_saved else {}))
    # absent gradients are distinct empty tensors (custom op outputs may not alias)
    return (dq, dk, dv, dlog_g if dlog_g is not None else q.new_empty(0),
            ds0 if ds0 is not None else q.new_empty(0), dz0 if dz0 is not None else q.new_empty(0))


_bwd_op = torch.library.custom_op("llmtrain::power_retention_bwd", _backward_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(q, k, v, log_g, s0, z0, dy, ds, dz, deg, scale, chunk_size, saved=None):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(log_g) if log_g is not None else q.new_empty(0),
            torch.empty_like(s0) if s0 is not None else q.new_empty(0),
            torch.empty_like(z0) if z0 is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, log_g, s0, z0, deg, scale, chunk_size, need_state, *_ = inputs
    saved = output[3]  # the kept chunk states (v3 and later), empty otherwise
    ctx.save_for_backward(q, k, v, log_g, s0, z0, saved)
    ctx.deg, ctx.scale, ctx.chunk_size, ctx.need_state = deg, scale, chunk_size, need_state
    ctx.generation = _cuda_generation()  # what the kept buffer holds depends on it (chunk cap, v9 rows)
    # Outputs without a gradient arrive as None instead of zeros: autograd would otherwise fill a
    # zero "gradient" as large as the kept buffer (~0.6 GB and 0.19 ms per call at 64K x 8 heads)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, ds, dz, _dsaved):
    q, k, v, log_g, s0, z0, saved = ctx.saved_tensors
    if _cuda_generation() != ctx.generation:
        # LLMTRAIN_RETENTION_KERNEL changed between this forward and its backward: the kept buffer
        # may be laid out for the other generation, so recompute instead of reading it
        saved = saved.new_empty(0)
    if not ctx.need_state:
        ds = dz = None
    if dy is None:  # only the final state is used
        dy = torch.zeros_like(q)
    if (ds is None) != (dz is None):  # one of the final state's two tensors is used: the other's is zero
        b, _, _, d = q.shape
        D, acc = reference.feature_dim(d, ctx.deg), _acc_dtype(q.dtype)
        if ds is None:
            ds = q.new_zeros(b, k.shape[2], D, d, dtype=acc)
        else:
            dz = q.new_zeros(b, k.shape[2], D, dtype=acc)
    bwd = _eager.backward_op(ctx, torch.ops.llmtrain.power_retention_bwd, _backward_impl)
    dq, dk, dv, dlog_g, ds0, dz0 = bwd(
        q, k, v, log_g, s0, z0, dy.contiguous(),
        ds.contiguous() if ds is not None else None, dz.contiguous() if dz is not None else None,
        ctx.deg, ctx.scale, ctx.chunk_size, saved if saved.numel() > 0 else None)
    return (dq, dk, dv, dlog_g if log_g is not None else None, ds0 if s0 is not None else None,
            dz0 if z0 is not None else None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_EagerFunction = _eager.autograd_function("PowerRetentionFunction", _forward, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# Torch fallback for devices without native kernels (float32 chunked form; same function)
# ---------------------------------------------------------------------------------------------


def _torch_forward(q, k, v, log_g, s0, z0, deg, scale, chunk_size):
    acc = _acc_dtype(q.dtype)
    init = (s0, z0) if s0 is not None else None
    y, (S, z) = reference.chunked(q, k, v, log_g, deg=deg, scale=scale, chunk_size=chunk_size,
                                  initial_state=init, dtype=acc)
    return y.to(q.dtype), S.to(acc), z.to(acc)


def _torch_backward(q, k, v, log_g, s0, z0, dy, ds, dz, deg, scale, chunk_size):
    inputs = [x.detach().requires_grad_(True) if x is not None else None for x in (q, k, v, log_g, s0, z0)]
    with torch.enable_grad():
        y, S, z = _torch_forward(*inputs, deg, scale, chunk_size)
        outs, grads = [y], [dy]
        for o, g in ((S, ds), (z, dz)):
            if g is not None:
                outs.append(o)
                grads.append(g)
        wrt = [x for x in inputs if x is not None]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
    res = []
    for x in inputs:
        if x is None:
            res.append(q.new_empty(0))
        else:
            g = next(got)
            res.append(torch.zeros_like(x) if g is None else g.to(x.dtype))
    return tuple(res)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, log_g, deg):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"power_retention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"power_retention: {name} must be [batch, time, heads, dim], got shape {tuple(x.shape)}")
    if deg != _DEG:
        raise ValueError(f"power_retention: deg={deg} is not implemented (deg=2 is)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"power_retention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"power_retention: floating-point inputs required, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"power_retention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d or k.shape != v.shape:
        raise ValueError(f"power_retention: k and v must be [{b}, {t}, kv_heads, {d}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] == 0 or hq % k.shape[2] != 0:
        raise ValueError(f"power_retention: mismatched heads: q has {hq} heads, not a multiple of k/v's {k.shape[2]}")
    if log_g is not None:
        if not isinstance(log_g, Tensor) or tuple(log_g.shape) != (b, t, k.shape[2]):
            shape = tuple(log_g.shape) if isinstance(log_g, Tensor) else type(log_g).__name__
            raise ValueError(f"power_retention: log_g must be [{b}, {t}, {k.shape[2]}], got {shape}")
        if log_g.device != q.device:
            raise ValueError(f"power_retention: log_g is on {log_g.device}, q on {q.device}")


def _check_state(state, q, k, acc):
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError("initial_state must be a RetentionState (state, sum_of_keys) tuple")
    b, hk, d = q.shape[0], k.shape[2], q.shape[3]
    D = reference.feature_dim(d, _DEG)
    S, z = state
    if tuple(S.shape) != (b, hk, D, d) or tuple(z.shape) != (b, hk, D):
        raise ValueError(f"initial_state: expected state [{b}, {hk}, {D}, {d}] and sum_of_keys [{b}, {hk}, {D}], "
                         f"got {tuple(S.shape)} and {tuple(z.shape)}")
    if S.device != q.device or z.device != q.device:
        raise ValueError(f"initial_state: on {S.device}, q on {q.device}")
    return S.to(acc).contiguous(), z.to(acc).contiguous()


def power_retention(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor] = None, *, deg: int = 2,
    scale: Optional[float] = None, chunk_size: Optional[int] = None,
    initial_state: Optional[RetentionState] = None, return_state: bool = False,
):
    """Gated power retention: y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij.

    w_ij = (scale * q_i.k_j)^deg * exp(G_i - G_j), G = cumsum(log_g) over time.

    Args:
        q: [batch, time, heads, dim]; k, v: [batch, time, kv_heads, dim] (heads % kv_heads == 0, GQA).
        log_g: optional [batch, time, kv_heads] log forget gate (<= 0, e.g. logsigmoid of a gate).
        deg: 2.
        scale: defaults to 1/sqrt(dim).
        chunk_size: tokens per chunk; by default chosen per time and dim. Any time length works.
        initial_state: a RetentionState to continue from (a prefix every query sees).
        return_state: also return the final RetentionState.

    Returns: y [batch, time, heads, dim] in q's dtype, or (y, RetentionState) with return_state.
    """
    _check_inputs(q, k, v, log_g, deg)
    cast = _native.autocast_dtype(q)
    if cast is not None:  # under autocast, compute in its dtype (state and gates stay float32)
        q, k, v = q.to(cast), k.to(cast), v.to(cast)
    b, t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"power_retention: scale must be finite and non-zero, got {scale}")
    if chunk_size is None:
        chunk_size = default_chunk_size(t, d, q.device.type, max(1, hq // k.shape[2]),
                                        q.device if q.device.type == "cuda" else None)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"power_retention: chunk_size must be a positive int, got {chunk_size!r}")
    acc = _acc_dtype(q.dtype)
    log_g = log_g.to(acc).contiguous() if log_g is not None else None
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = _check_state(initial_state, q, k, acc)
    # (one chunk and no initial state: no chunk states to keep; from v9 on, the fp32 y and 1 / den
    # that spare the backward a pass, 260 bytes per token and head at d = 64)
    keep = _keep_states(q) and torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, log_g, s0, z0)) and (
        s0 is not None or _cuda_chunk_count(t, chunk_size) > 1 or _cuda_generation() >= 9)
    fwd = torch.ops.llmtrain.power_retention_fwd if _eager.tracing(q) else _EagerFunction.apply
    y, S, z, _ = fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), log_g, s0, z0, deg, scale, chunk_size, return_state, keep)
    return (y, RetentionState(S, z)) if return_state else y


def power_retention_step(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor] = None, *,
    state: Optional[RetentionState] = None, deg: int = 2, scale: Optional[float] = None, inplace: bool = False,
) -> tuple[Tensor, RetentionState]:
    """Advance a recurrent state by the given tokens (usually one) and return (y, new_state).

    The inference path of generation: cost per token is independent of the context length.
    With ``inplace=True`` the given state tensors are updated in place (a decoding cache).
    When gradients are required this runs the chunked op from ``state`` instead.
    """
    _check_inputs(q, k, v, log_g, deg)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if state is None:
        D = reference.feature_dim(d, deg)
        state = RetentionState(q.new_zeros(b, hk, D, d, dtype=acc), q.new_zeros(b, hk, D, dtype=acc))
        inplace = True
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, log_g, *state))
    if needs_grad:
        return power_retention(q, k, v, log_g, deg=deg, scale=scale, chunk_size=max(t, 1),
                               initial_state=state, return_state=True)
    S, z = _check_state(state, q, k, acc)
    if inplace and (S.data_ptr() != state.state.data_ptr() or z.data_ptr() != state.sum_of_keys.data_ptr()):
        raise ValueError("power_retention_step: inplace=True needs contiguous state tensors in the "
                         f"accumulation dtype {acc}")
    if not inplace:
        S, z = S.clone(), z.clone()
    log_g = log_g.to(acc).contiguous() if log_g is not None else None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not _native.supports(q):
        y, (S2, z2) = reference.recurrent(q, k, v, log_g, deg=deg, scale=scale, initial_state=(S, z), dtype=acc)
        S.copy_(S2)
        z.copy_(z2)
        return y.to(q.dtype), RetentionState(S, z)
    y = torch.empty_like(q)
    bad = _native.native().power_retention_step(
        _native.dl(q), _native.dl(k), _native.dl(v), _native.dl(log_g), _native.dl(S), _native.dl(z),
        _native.dl(y), deg, scale, _native.stream_of(q), **_workspace(q, k, max(t, 1), 2))
    if bad > 0 and _all_finite(q, k, v, log_g):  # (the state was updated in place: not checked)
        raise FloatingPointError(f"power_retention_step: {bad} non-finite outputs (inputs overflow {acc})")
    return y, RetentionState(S, z)
