"""Float64 references for gated power retention (deg 2, optional GQA, optional initial state).

The function (the public ``retention`` package, 1.0.7):

    y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij,    w_ij = (s * q_i . k_j)^deg * exp(G_i - G_j),

with G the inclusive cumulative sum of log_g over time. Layout [batch, time, heads, dim]; query
head h reads KV head h // (hq // hk). Three forms that must agree to rounding:

- ``quadratic``: the definition, O(t^2).
- ``chunked``: intra-chunk quadratic attention plus a state carried between chunks.
- ``recurrent``: one token at a time, the decoding form.

The state uses the canonical symmetric feature map: for deg 2, phi(x) has D = d(d+1)/2 entries
x_a^2 (a = b) and sqrt(2) x_a x_b (a < b), in row-major upper-triangle order, so that
phi(x) . phi(y) = (x . y)^2. The state of one KV head is S = sum_j phi(k_j) v_j^T [D, d] and the
sum of keys z = sum_j phi(k_j) [D], both decayed by the gate. An initial state (S0, z0) acts as
a prefix that every query sees with weight exp(G_i).
"""

from __future__ import annotations

import math

import torch


def feature_dim(d: int, deg: int = 2) -> int:
    """Size of the symmetric power feature map."""
    if deg == 1:
        return d
    if deg == 2:
        return d * (d + 1) // 2
    raise ValueError(f"deg must be 1 or 2, got {deg}")


def _triu_indices(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(d, d, device=device).unbind(0)


def sym_power_features(x: torch.Tensor, deg: int = 2) -> torch.Tensor:
    """phi(x) over the last dimension: [..., d] -> [..., D] with phi(x).phi(y) = (x.y)^deg."""
    if deg == 1:
        return x
    if deg != 2:
        raise ValueError(f"deg must be 1 or 2, got {deg}")
    d = x.shape[-1]
    a, b = _triu_indices(d, x.device)
    weight = torch.full(a.shape, math.sqrt(2.0), dtype=x.dtype, device=x.device)
    weight[a == b] = 1.0
    return x[..., a] * x[..., b] * weight


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[b, t, hk, ...] -> [b, t, hq, ...] for GQA (query head h uses KV head h // ratio)."""
    hk = x.shape[2]
    return x if hk == hq else x.repeat_interleave(hq // hk, dim=2)


def _prep(q, k, v, log_g, scale, dtype=torch.float64):
    b, t, hq, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    if log_g is None:
        log_g = torch.zeros(b, t, k.shape[2], dtype=dtype, device=q.device)
    return q, k, v, log_g.to(dtype), float(scale)


def quadratic(q, k, v, log_g=None, *, deg=2, scale=None, initial_state=None):
    """The definition, O(t^2) in float64. Returns y [b, t, hq, d]."""
    q, k, v, log_g, scale = _prep(q, k, v, log_g, scale)
    hq = q.shape[2]
    G = _expand_kv(log_g.cumsum(1), hq)                            # [b, t, hq]
    k, v = _expand_kv(k, hq), _expand_kv(v, hq)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    decay = (G.transpose(1, 2)[..., :, None] - G.transpose(1, 2)[..., None, :])
    w = scores.pow(deg) * torch.exp(decay.masked_fill(~causal, float("-inf")))
    num = torch.einsum("bhij,bjhd->bihd", w, v)
    den = w.sum(-1).transpose(1, 2)                                # [b, t, hq]
    if initial_state is not None:
        S0, z0 = (_expand_kv(s.double().unsqueeze(1), hq).squeeze(1) for s in initial_state)
        phi_q = sym_power_features(q * scale, deg) * torch.exp(G)[..., None]
        num = num + torch.einsum("bthD,bhDe->bthe", phi_q, S0)
        den = den + torch.einsum("bthD,bhD->bth", phi_q, z0)
    return num / den[..., None]


def _final_state(k, v, log_g, deg, initial_state):
    """State after the whole sequence, per KV head: S [b, hk, D, d], z [b, hk, D]."""
    G = log_g.cumsum(1)                                            # [b, t, hk]
    decay = torch.exp(G[:, -1:] - G)                               # [b, t, hk]
    phi_k = sym_power_features(k, deg) * decay[..., None]
    S = torch.einsum("bthD,bthe->bhDe", phi_k, v)
    z = phi_k.sum(1)
    if initial_state is not None:
        total = torch.exp(G[:, -1])[..., None]                     # [b, hk, 1]
        S = S + initial_state[0].double() * total[..., None]
        z = z + initial_state[1].double() * total
    return S, z


def chunked(q, k, v, log_g=None, *, deg=2, scale=None, chunk_size=64, initial_state=None, dtype=torch.float64):
    """Chunked form, in float64 unless ``dtype`` says otherwise: returns (y, (S, z)) with the
    final state per KV head.

    Within a chunk the weights are formed directly; across chunks the state carries the
    past. Every gate factor is exp of a non-positive number when log_g <= 0: queries see the
    state through exp(g_i) with g the within-chunk cumulative gate, keys enter it through
    exp(g_last - g_j), and the state decays by exp(g_last) per chunk.
    """
    q, k, v, log_g, scale = _prep(q, k, v, log_g, scale, dtype)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    D = feature_dim(d, deg)
    if initial_state is None:
        S = q.new_zeros(b, hk, D, d)
        z = q.new_zeros(b, hk, D)
    else:
        S, z = (s.to(dtype) for s in initial_state)
    ys = []
    for start in range(0, t, chunk_size):
        sl = slice(start, min(start + chunk_size, t))
        qc, kc, vc = q[:, sl], k[:, sl], v[:, sl]
        g = log_g[:, sl].cumsum(1)                                 # [b, c, hk] within-chunk
        c = qc.shape[1]
        # intra-chunk
        gq = _expand_kv(g, hq)
        scores = torch.einsum("bihd,bjhd->bhij", qc, _expand_kv(kc, hq)) * scale
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        decay = gq.transpose(1, 2)[..., :, None] - gq.transpose(1, 2)[..., None, :]
        w = scores.pow(deg) * torch.exp(decay.masked_fill(~causal, float("-inf")))
        num = torch.einsum("bhij,bjhd->bihd", w, _expand_kv(vc, hq))
        den = w.sum(-1).transpose(1, 2)
        # inter-chunk: the state so far, seen through exp(g_i)
        phi_q = sym_power_features(qc * scale, deg) * torch.exp(gq)[..., None]
        Sq, zq = _expand_kv(S.unsqueeze(1), hq).squeeze(1), _expand_kv(z.unsqueeze(1), hq).squeeze(1)
        num = num + torch.einsum("bthD,bhDe->bthe", phi_q, Sq)
        den = den + torch.einsum("bthD,bhD->bth", phi_q, zq)
        ys.append(num / den[..., None])
        # state update
        total = g[:, -1]                                           # [b, hk]
        phi_k = sym_power_features(kc, deg) * torch.exp(total[:, None] - g)[..., None]
        S = S * torch.exp(total)[..., None, None] + torch.einsum("bthD,bthe->bhDe", phi_k, vc)
        z = z * torch.exp(total)[..., None] + phi_k.sum(1)
    return torch.cat(ys, 1), (S, z)


def recurrent(q, k, v, log_g=None, *, deg=2, scale=None, initial_state=None, dtype=torch.float64):
    """One token at a time (the decoding form), in float64 unless ``dtype`` says otherwise:
    returns (y, (S, z))."""
    q, k, v, log_g, scale = _prep(q, k, v, log_g, scale, dtype)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    D = feature_dim(d, deg)
    if initial_state is None:
        S, z = q.new_zeros(b, hk, D, d), q.new_zeros(b, hk, D)
    else:
        S, z = (s.to(dtype) for s in initial_state)
    ys = []
    for i in range(t):
        decay = torch.exp(log_g[:, i])                             # [b, hk]
        phi_k = sym_power_features(k[:, i], deg)                   # [b, hk, D]
        S = S * decay[..., None, None] + phi_k[..., None] * v[:, i, :, None, :]
        z = z * decay[..., None] + phi_k
        phi_q = sym_power_features(q[:, i] * scale, deg)           # [b, hq, D]
        Sq = _expand_kv(S.unsqueeze(1), hq).squeeze(1)
        zq = _expand_kv(z.unsqueeze(1), hq).squeeze(1)
        num = torch.einsum("bhD,bhDe->bhe", phi_q, Sq)
        den = torch.einsum("bhD,bhD->bh", phi_q, zq)
        ys.append(num / den[..., None])
    return torch.stack(ys, 1), (S, z)


def final_state(k, v, log_g=None, *, deg=2, initial_state=None):
    """The state after the whole sequence, directly from its definition."""
    k, v = k.double(), v.double()
    if log_g is None:
        log_g = torch.zeros(k.shape[:3], dtype=torch.float64, device=k.device)
    return _final_state(k, v, log_g.double(), deg, initial_state)


# ---------------------------------------------------------------------------------------------
# The state part of dq (and, with k and the state gradient, of dk), two ways
# ---------------------------------------------------------------------------------------------


def state_query_grad(S: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d/dx of sum_i g_i . (phi(x_i) @ S) = J_phi(x_i)^T (S g_i), row by row.

    S: [D, e] canonical state (any number of columns e: values, the normaliser, padding); g: [m, e];
    x: [m, d]. With u = g S^T and phi_f = w x_a x_b: dx_a += w x_b u_f, dx_b += w x_a u_f (the
    diagonal, w = 1, gets both: 2 x_a u_f). This is the kernels' u-GEMM + per-row contraction.
    """
    d = x.shape[-1]
    a, b = _triu_indices(d, x.device)
    w = torch.full(a.shape, math.sqrt(2.0), dtype=x.dtype, device=x.device)
    w[a == b] = 1.0
    u = (g @ S.T) * w
    out = torch.zeros_like(x)
    out.index_add_(1, a, u * x[:, b])
    out.index_add_(1, b, u * x[:, a])
    return out


def state_query_grad_slabs(S: torch.Tensor, g: torch.Tensor, x: torch.Tensor, rows_per_slab: int = 8,
                           operand_dtype: torch.dtype | None = None) -> torch.Tensor:
    """state_query_grad in the order of the planned GEMM-form kernel (docs/perf.md, "next"): no per-row
    contraction, only two GEMMs per slab of triangle rows R = [a0, a0 + rows_per_slab) against the
    raw canonical state rows, mirrored:

      (1) out[:, b] += sum_{a in R, c} (x_a g_c) S[f(a, b), c]    for b >= a   (K = (a, c), N = b)
      (2) out[:, a] += sum_{b >= a, c} (x_b g_c) S[f(a, b), c]    for a in R   (K = (b, c), N = a)

    The A operands are g's rows scaled by one x column (x_a g_c); the B operands are state rows
    f(min, max) read as they lie (a zero row where b < a). Both GEMMs see the diagonal feature, so the
    slab's diagonal rows are scaled by 1/sqrt2 and the sum by sqrt2 once at the end: off-diagonal
    weight sqrt2, diagonal 2. operand_dtype (e.g. bfloat16) rounds the A and B operands as the tensor
    cores would, accumulating in x's dtype, to predict the kernel's error.
    """
    d = x.shape[-1]
    D = S.shape[0]
    if D != d * (d + 1) // 2:
        raise ValueError(f"state_query_grad_slabs: S has {D} rows, the canonical map of d = {d} has {d * (d + 1) // 2}")
    rows = torch.arange(d, device=x.device)
    rnd = (lambda t: t.to(operand_dtype).to(x.dtype)) if operand_dtype is not None else (lambda t: t)
    out = torch.zeros_like(x)
    for a0 in range(0, d, rows_per_slab):
        R = rows[a0:a0 + rows_per_slab]
        lo, hi = torch.minimum(R[:, None], rows[None, :]), torch.maximum(R[:, None], rows[None, :])
        f = lo * d - lo * (lo - 1) // 2 + hi - lo  # row_start(lo) + hi - lo
        slab = S[f]  # [G, d, e]: row f(a, b), mirrored for b < a ...
        slab = torch.where((rows[None, :] >= R[:, None])[..., None], slab, torch.zeros_like(slab))  # ... then zeroed
        diag = R[:, None] == rows[None, :]
        slab = torch.where(diag[..., None], slab * (1 / math.sqrt(2.0)), slab)
        slab = rnd(slab)
        out += torch.einsum("iac,abc->ib", rnd(x[:, R, None] * g[:, None, :]), slab)  # (1)
        out[:, R] += torch.einsum("ibc,abc->ia", rnd(x[:, :, None] * g[:, None, :]), slab)  # (2)
    return out * math.sqrt(2.0)
