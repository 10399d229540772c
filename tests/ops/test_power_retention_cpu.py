"""The CPU kernels against the float64 references: forward, state, gradients, decode step."""

import math

import pytest
import torch

import llmtrain.ops as ops
from llmtrain import _C
from llmtrain.ops.power_retention import reference as R
from tests.conftest import rel_err
from tests.ops.retention_inputs import make_inputs

TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (b, t, hq, hk, d, chunk): t = 1, t not a multiple of the chunk, b = 3, h = 5, GQA 4:1, d in {32, 64, 128}
GRID = [
    (1, 1, 1, 1, 32, 16),
    (3, 45, 5, 5, 32, 16),
    (2, 70, 8, 2, 64, 32),
    (1, 33, 4, 1, 128, 16),
    (2, 130, 4, 1, 64, None),
]


@pytest.mark.parametrize("b,t,hq,hk,d,chunk", GRID)
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_state(rng, b, t, hq, hk, d, chunk, gating, initial_state, dtype):
    q, k, v, log_g, state = make_inputs(b, t, hq, hk, d, dtype=dtype, gating=gating,
                                        initial_state=initial_state, gen=rng)
    y, (S, z) = ops.power_retention(q, k, v, log_g, chunk_size=chunk, initial_state=state, return_state=True)
    y_ref, (S_ref, z_ref) = R.chunked(q, k, v, log_g, chunk_size=16, initial_state=state)
    assert y.dtype == dtype and S.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype]
    # the state is accumulated in fp32 from the (rounded) inputs: fp32 tolerance whatever the dtype
    assert rel_err(S, S_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5


def test_float16_and_float64(rng):
    for dtype in (torch.float16, torch.float64):
        q, k, v, log_g, state = make_inputs(2, 50, 4, 2, 32, dtype=dtype, initial_state=True, gen=rng)
        y = ops.power_retention(q, k, v, log_g, chunk_size=16, initial_state=state)
        assert rel_err(y, R.quadratic(q, k, v, log_g, initial_state=state)) < TOL[dtype]


def _grads(fn, inputs, cot):
    out = fn(*inputs)
    loss = sum((o * c).sum() for o, c in zip(out, cot))
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


@pytest.mark.parametrize("b,t,hq,hk,d,chunk", GRID[:4])
@pytest.mark.parametrize("gating,initial_state,with_state_grad", [(True, True, True), (True, False, False),
                                                                  (False, True, False), (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_reference(rng, b, t, hq, hk, d, chunk, gating, initial_state, with_state_grad, dtype):
    q, k, v, log_g, state = make_inputs(b, t, hq, hk, d, dtype=dtype, gating=gating,
                                        initial_state=initial_state, gen=rng, requires_grad=True)
    s0, z0 = state if state is not None else (None, None)
    inputs = (q, k, v, log_g, s0, z0)

    def ours(q, k, v, log_g, s0, z0):
        init = (s0, z0) if s0 is not None else None
        y, (S, z) = ops.power_retention(q, k, v, log_g, chunk_size=chunk, initial_state=init, return_state=True)
        return (y, S, z) if with_state_grad else (y,)

    def ref(q, k, v, log_g, s0, z0):
        init = (s0, z0) if s0 is not None else None
        y, (S, z) = R.chunked(q, k, v, log_g, chunk_size=8, initial_state=init)
        return (y, S, z) if with_state_grad else (y,)

    with torch.no_grad():
        outs = ref(*inputs)
    cot = [torch.randn(o.shape, generator=rng, dtype=torch.float64) / math.sqrt(o.numel()) for o in outs]
    got = _grads(ours, inputs, [c.to(o.dtype) for c, o in zip(cot, outs)])
    want = _grads(ref, inputs, cot)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    # some gradients are exactly zero in exact arithmetic (dq, dk at t = 1): measure those against the
    # largest gradient's norm rather than their own rounding noise
    floor = 1e-2 * max(w.norm().item() for w in want)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g.double() - w).norm() <= tol * max(w.norm().item(), floor)


@pytest.mark.parametrize("used", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, True, False)])
def test_gradients_when_some_outputs_are_unused(rng, used):
    """Outputs that get no gradient reach the backward as None (no zero tensors are materialised, in
    particular none as large as the kept buffer): y, S or z unused gives the same gradients as a
    zero cotangent for it."""
    q, k, v, log_g, state = make_inputs(2, 40, 4, 2, 8, dtype=torch.float64, initial_state=True, gen=rng,
                                        requires_grad=True)
    inputs = (q, k, v, log_g, *state)

    def outs(fn):
        y, (S, z) = fn(q, k, v, log_g, chunk_size=16, initial_state=state, return_state=True)
        return y, S, z

    def ref_fn(*a, chunk_size, initial_state, return_state):
        return R.chunked(*a, chunk_size=8, initial_state=initial_state)

    cot = [torch.randn(o.shape, generator=rng, dtype=torch.float64) for o in outs(ref_fn)]
    def loss(fn):
        return sum((o * c).sum() for o, c, u in zip(outs(fn), cot, used) if u)

    got = torch.autograd.grad(loss(ops.power_retention), inputs)
    want = torch.autograd.grad(loss(ref_fn), inputs, allow_unused=True)  # q does not reach S, z
    for g, w, x in zip(got, want, inputs):
        w = torch.zeros_like(x) if w is None else w
        assert torch.isfinite(g).all()
        assert (g - w).norm() <= 1e-9 * max(w.norm().item(), 1e-12)


def test_gradcheck_float64(rng):
    q, k, v, log_g, state = make_inputs(1, 9, 2, 1, 4, dtype=torch.float64, initial_state=True, gen=rng,
                                        requires_grad=True)

    def fn(q, k, v, log_g, s0, z0):
        y, (S, z) = ops.power_retention(q, k, v, log_g, chunk_size=4, initial_state=(s0, z0), return_state=True)
        return y, S, z

    assert torch.autograd.gradcheck(fn, (q, k, v, log_g, *state), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_chunk_size_does_not_change_the_function(rng):
    q, k, v, log_g, _ = make_inputs(2, 77, 4, 2, 32, gen=rng)
    ys = [ops.power_retention(q, k, v, log_g, chunk_size=c) for c in (1, 7, 16, 64, 77, 500)]
    for y in ys[1:]:
        assert rel_err(y, ys[0]) < 1e-5


def test_runs_are_bitwise_identical(rng):
    q, k, v, log_g, _ = make_inputs(3, 90, 5, 5, 32, gen=rng, requires_grad=True)
    outs = []
    for _ in range(2):
        y = ops.power_retention(q, k, v, log_g, chunk_size=32)
        outs.append((y, *torch.autograd.grad(y.square().sum(), (q, k, v, log_g))))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_is_written(rng, dtype):
    """Call the binding directly on NaN-poisoned outputs: every element must be overwritten."""
    q, k, v, log_g, state = make_inputs(3, 45, 5, 5, 32, dtype=dtype, initial_state=True, gen=rng)
    y = torch.full_like(q, float("nan"))
    S, z = (torch.full_like(s, float("nan")) for s in state)
    bad = _C.power_retention_fwd(q, k, v, log_g, *state, y, S, z, 2, 1 / math.sqrt(32), 16)
    assert bad == 0 and torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(z).all()
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v, log_g, *state)]
    dy = torch.randn(q.shape, generator=rng).to(dtype)
    _C.power_retention_bwd(q, k, v, log_g, *state, dy, None, None, *grads, 2, 1 / math.sqrt(32), 16)
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("gating", [True, False])
def test_step_matches_chunked(rng, gating):
    """Token-by-token decoding from a prefix state equals the chunked forward over the whole."""
    q, k, v, log_g, _ = make_inputs(2, 24, 8, 2, 32, gating=gating, gen=rng)
    y_full = ops.power_retention(q, k, v, log_g, chunk_size=8)
    y0, state = ops.power_retention(q[:, :10], k[:, :10], v[:, :10], None if log_g is None else log_g[:, :10],
                                    return_state=True)
    ys = [y0]
    for i in range(10, 24):
        sl = slice(i, i + 1)
        y, state = ops.power_retention_step(q[:, sl], k[:, sl], v[:, sl],
                                            None if log_g is None else log_g[:, sl], state=state, inplace=True)
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-5


def test_step_from_empty_state_and_not_inplace(rng):
    q, k, v, log_g, state = make_inputs(1, 5, 2, 1, 32, initial_state=True, gen=rng)
    before = [s.clone() for s in state]
    y, new = ops.power_retention_step(q, k, v, log_g, state=ops.RetentionState(*state))
    assert all(torch.equal(a, b) for a, b in zip(before, state))  # not modified
    y_ref, (S_ref, _) = R.recurrent(q, k, v, log_g, initial_state=state)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(new.state, S_ref) < 1e-5
    y2, _ = ops.power_retention_step(q, k, v, log_g)  # no state: starts from zero
    assert rel_err(y2, R.recurrent(q, k, v, log_g)[0]) < 1e-5


def test_step_with_grad_uses_autograd_path(rng):
    q, k, v, log_g, state = make_inputs(1, 3, 2, 1, 32, initial_state=True, gen=rng, requires_grad=True)
    y, new = ops.power_retention_step(q, k, v, log_g, state=ops.RetentionState(*state))
    y.sum().backward()
    assert q.grad is not None and state[0].grad is not None


def test_cuda_chunk_policy_by_generation(monkeypatch):
    """The CUDA chunk policy (pure Python, mirrors csrc/ops.h retention_cuda_chunk): v7 and later run
    a sequence up to single_chunk_max(d) as one chunk (v10's table: its flash kernels) and accept
    chunks up to 8192; v1 .. v6 cap chunks at 1024. Decides whether the forward keeps chunk states
    for the backward."""
    from llmtrain.ops.power_retention import op as O

    for ver, table in (("v7", O.SINGLE_CHUNK_MAX_V7), ("v9", O.SINGLE_CHUNK_MAX_V7), ("v10", O.SINGLE_CHUNK_MAX),
                       ("v11", O.SINGLE_CHUNK_MAX)):
        monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", ver)
        assert O._cuda_generation() == int(ver[1:])
        for d, tmax in table.items():
            assert O.single_chunk_max(d) == tmax
            if tmax == 0:  # never one chunk at this head dim
                assert O.default_chunk_size(1000, d, "cuda") < 1000
                continue
            assert O.default_chunk_size(tmax, d, "cuda") == tmax
            assert O.default_chunk_size(tmax + 1, d, "cuda") < tmax + 1
            assert O._cuda_chunk_count(tmax, O.default_chunk_size(tmax, d, "cuda")) == 1
        assert O._cuda_chunk_count(5000, 4096) == 2
        assert O._cuda_chunk_count(20000, 20000) == 3  # capped at 8192
        assert O._cuda_chunk_count(1, 256) == 1
    assert O.SINGLE_CHUNK_MAX[64] > O.SINGLE_CHUNK_MAX_V7[64]
    # the forward's workspace kind: 4 for one chunk without states; v11 keeps rows after the chunk
    # states (kind 5) when the buffer is kept for the backward, else the general kind 0
    s0 = torch.zeros(1)
    for ver, kept_kind in (("v10", 0), ("v11", 5)):
        monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", ver)
        assert O._fwd_workspace_kind(1000, 1024, None, False, True) == 4
        assert O._fwd_workspace_kind(5000, 256, None, False, True) == kept_kind
        assert O._fwd_workspace_kind(1000, 1024, s0, False, True) == kept_kind
        assert O._fwd_workspace_kind(1000, 1024, None, True, True) == kept_kind
        assert O._fwd_workspace_kind(5000, 256, None, False, False) == 0
    monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", "v6")
    assert O.single_chunk_max(64) == 0
    assert O.default_chunk_size(2048, 64, "cuda") == 256
    assert O._cuda_chunk_count(5000, 4096) == 5  # capped at 1024
    assert O._cuda_chunk_count(900, 4096) == 1
    assert O.default_chunk_size(2048, 64, "cpu") == 512  # the CPU policy does not depend on it
    # v20 (LOCAL scan up to 512 rows): chunk 512 at d = 64 past one chunk, 256 under GQA; v18 256
    for ver, mha, gqa in (("v18", 256, 256), ("v20", 512, 256)):
        monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", ver)
        assert O.default_chunk_size(65536, 64, "cuda") == mha
        assert O.default_chunk_size(65536, 64, "cuda", group=2) == gqa
        assert O.default_chunk_size(65536, 128, "cuda") == 1024
        assert O.default_chunk_size(65536, 32, "cuda") == 128
        assert O.default_chunk_size(65536, 64, "cpu", group=4) == 512
    # off Hopper (where the 512-row LOCAL kernel may not fit or was not measured) v20 keeps 256:
    # the rule reads the device's compute capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, chunk in (((9, 0), 512), ((8, 0), 256), ((8, 9), 256), ((12, 0), 256)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert O._wide_local_scan() == (chunk == 512)
        assert O.default_chunk_size(65536, 64, "cuda") == chunk
    monkeypatch.delenv("LLMTRAIN_RETENTION_KERNEL")
    assert O._cuda_generation() == int(O.DEFAULT_CUDA_KERNEL[1:])


def test_generation_switch_between_forward_and_backward(rng, monkeypatch):
    """A backward under another LLMTRAIN_RETENTION_KERNEL than its forward's does not read the
    forward's kept buffer (laid out for the other generation's chunk cap and v9 rows): it recomputes.
    On the CPU the buffer is always empty; this checks the guard's bookkeeping and the gradients."""
    from llmtrain.ops.power_retention import op as O

    q, k, v = (torch.randn(1, 40, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", "v9")
    y = O.power_retention(q, k, v)
    assert y.grad_fn is not None
    monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", "v6")
    g_switched = torch.autograd.grad(y.sum(), (q, k, v))
    monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", "v9")
    g_same = torch.autograd.grad(O.power_retention(q, k, v).sum(), (q, k, v))
    for a, b in zip(g_switched, g_same):
        torch.testing.assert_close(a, b)
