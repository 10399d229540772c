"""Shared helpers for the MLX tests: random inputs and float64 torch references with gradients."""

from __future__ import annotations

import numpy as np
import torch

from llmtrain.ops.power_retention import reference as pr_ref
from llmtrain.ops.rmsnorm_linear import reference as rl_ref


def retention_inputs(seed, b, t, hq, hk, d, gated, init):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for h in (hq, hk, hk))
    lg = np.log(rng.uniform(0.7, 1.0, (b, t, hk))).astype(np.float32) if gated else None
    S0 = z0 = None
    if init:
        D = d * (d + 1) // 2
        # a plausible state: a prefix of a few tokens
        kp = rng.standard_normal((b, 5, hk, d))
        vp = rng.standard_normal((b, 5, hk, d))
        S0, z0 = (x.numpy().astype(np.float32) for x in pr_ref.final_state(torch.tensor(kp), torch.tensor(vp)))
    return dict(q=q, k=k, v=v, lg=lg, S0=S0, z0=z0)


def cotangents(seed, inp):
    rng = np.random.default_rng(seed + 1000)
    b, t, hq, d = inp["q"].shape
    hk = inp["k"].shape[2]
    D = d * (d + 1) // 2
    return dict(dy=rng.standard_normal((b, t, hq, d)).astype(np.float32),
                dS=(rng.standard_normal((b, hk, D, d)) * 0.01).astype(np.float32),
                dz=(rng.standard_normal((b, hk, D)) * 0.01).astype(np.float32))


def retention_reference(inp, cot, *, with_state):
    """float64: y, final (S, z), and the gradients of <dy, y> (+ <dS, S> + <dz, z>) wrt every input."""
    names = [n for n in ("q", "k", "v", "lg", "S0", "z0") if inp[n] is not None]
    ts = {n: torch.tensor(inp[n], dtype=torch.float64, requires_grad=True) for n in names}
    init = (ts["S0"], ts["z0"]) if "S0" in ts else None
    y = pr_ref.quadratic(ts["q"], ts["k"], ts["v"], ts.get("lg"), initial_state=init)
    S, z = pr_ref.final_state(ts["k"], ts["v"], ts.get("lg"), initial_state=init)
    loss = (y * torch.tensor(cot["dy"], dtype=torch.float64)).sum()
    if with_state:
        loss = loss + (S * torch.tensor(cot["dS"], dtype=torch.float64)).sum() + (z * torch.tensor(cot["dz"], dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, [ts[n] for n in names])
    return y.detach().numpy(), S.detach().numpy(), z.detach().numpy(), dict(zip(names, (g.numpy() for g in grads)))


def rmsnorm_linear_reference(x, g, w, b, dy, eps=1e-6):
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) if a is not None else None for a in (x, g, w, b)]
    y = rl_ref.rmsnorm_linear(ts[0].reshape(-1, x.shape[-1]), ts[1], ts[2], ts[3], eps)
    y = y.reshape(*x.shape[:-1], w.shape[0])
    wrt = [t for t in ts if t is not None]
    grads = torch.autograd.grad((y * torch.tensor(dy, dtype=torch.float64)).sum(), wrt)
    return y.detach().numpy(), [g.numpy() for g in grads]


def assert_close(got, want, tol, what="", floor=1e-2):
    """Max abs error relative to max(|want|.max(), floor): a value that is zero analytically (dq at
    t = 1) is pure rounding."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = max(np.abs(want).max(), floor)
    err = np.abs(got - want).max() / scale
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref|) > {tol:.1e}"
