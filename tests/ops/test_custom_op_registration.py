"""torch.library registration: opcheck passes and the ops trace under torch.compile."""

import pytest
import torch

import llmtrain.ops as ops
from llmtrain.ops.cross_entropy import linear_cross_entropy
from tests.ops.retention_inputs import make_inputs


def test_opcheck_power_retention(rng):
    q, k, v, log_g, state = make_inputs(2, 19, 4, 2, 8, initial_state=True, gen=rng, requires_grad=True)
    samples = [
        (q, k, v, log_g, *state, 2, 0.35, 8, True),
        (q, k, v, None, None, None, 2, 0.35, 5, False),
        (q, k, v, log_g, None, None, 2, 0.35, 32, True),
        (q, k, v, log_g, *state, 2, 0.35, 8, False, True),  # keep_states: a no-op off CUDA (empty saved)
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.llmtrain.power_retention_fwd.default, args)
    saved = torch.ops.llmtrain.power_retention_fwd(*samples[-1])[3]
    assert saved.dtype == torch.uint8 and saved.numel() == 0


def test_retention_v3_selector_does_not_change_cpu(rng, monkeypatch):
    """LLMTRAIN_RETENTION_KERNEL=v3 (keep the forward's chunk states for the backward) only acts on
    CUDA: on CPU the outputs and gradients are bitwise those of the default path."""
    q, k, v, log_g, state = make_inputs(1, 21, 2, 1, 8, initial_state=True, gen=rng, requires_grad=True)

    def run():
        y, (S, z) = ops.power_retention(q, k, v, log_g, chunk_size=8, initial_state=state, return_state=True)
        grads = torch.autograd.grad((y.sum() + S.sum() + z.sum()), (q, k, v, log_g, *state))
        return (y, S, z, *grads)

    monkeypatch.delenv("LLMTRAIN_RETENTION_KERNEL", raising=False)
    ref = run()
    monkeypatch.setenv("LLMTRAIN_RETENTION_KERNEL", "v3")
    for a, b in zip(run(), ref):
        assert torch.equal(a, b)


def test_opcheck_rmsnorm_linear(rng):
    x = torch.randn(11, 16, generator=rng, requires_grad=True)
    g = torch.randn(16, generator=rng, requires_grad=True)
    w = torch.randn(8, 16, generator=rng, requires_grad=True)
    b = torch.randn(8, generator=rng, requires_grad=True)
    torch.library.opcheck(torch.ops.llmtrain.rmsnorm_linear_fwd.default, (x, g, w, b, 1e-6))
    torch.library.opcheck(torch.ops.llmtrain.rmsnorm_linear_fwd.default, (x, g, w, None, 1e-5))


@pytest.mark.slow
def test_compiles_without_graph_breaks(rng):
    q, k, v, log_g, _ = make_inputs(1, 12, 2, 1, 8, gen=rng, requires_grad=True)
    x = torch.randn(3, 12, 8, generator=rng)
    g, w = torch.ones(8), torch.randn(8, 8, generator=rng)

    def f(q, k, v, log_g, x):
        h = ops.rmsnorm_linear(x, g, w).reshape(3, 12, 1, 8)
        return ops.power_retention(q, k, v, log_g, chunk_size=4).sum() + h.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, log_g, x)
    torch.testing.assert_close(out, f(q, k, v, log_g, x))
    out.backward()
    assert q.grad is not None and log_g.grad is not None


def test_ops_follow_autocast(rng):
    q, k, v, log_g, _ = make_inputs(1, 10, 2, 1, 8, gen=rng)
    x, g, w = torch.randn(3, 8, generator=rng), torch.ones(8), torch.randn(4, 8, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.power_retention(q, k, v, log_g).dtype == torch.bfloat16
        assert ops.rmsnorm_linear(x, g, w).dtype == torch.bfloat16
    assert ops.rmsnorm_linear(x, g, w).dtype == torch.float32


def _node_names(t, depth=4):
    """The autograd node types within a few steps of t's grad_fn."""
    names, frontier = set(), [t.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names.update(type(f).__name__ for f in frontier)
        frontier = [n for f in frontier for n, _ in f.next_functions]
    return names


def _grads(out, inputs):
    return torch.autograd.grad(out.float().pow(2).sum(), [t for t in inputs if t is not None and t.requires_grad])


@pytest.mark.parametrize("name", ["rmsnorm_linear", "power_retention", "linear_cross_entropy"])
def test_eager_calls_skip_custom_op_dispatch_with_the_same_results(rng, name):
    """Eager calls run the ops' implementations through a plain autograd.Function (custom-op dispatch
    costs ~125 us of host time per call: docs/perf.md, session 10); the registered custom op, which
    torch.compile traces, computes the same outputs and gradients bit for bit."""
    if name == "rmsnorm_linear":
        x = torch.randn(7, 16, generator=rng, requires_grad=True)
        g = torch.randn(16, generator=rng, requires_grad=True)
        w = torch.randn(8, 16, generator=rng, requires_grad=True)
        b = torch.randn(8, generator=rng, requires_grad=True)
        inputs = (x, g, w, b)
        eager = ops.rmsnorm_linear(x, g, w, b, 1e-6)
        custom = torch.ops.llmtrain.rmsnorm_linear_fwd(x, g, w, b, 1e-6)[0]
    elif name == "power_retention":
        q, k, v, log_g, _ = make_inputs(2, 19, 4, 2, 8, gen=rng, requires_grad=True)
        inputs = (q, k, v, log_g)
        eager = ops.power_retention(q, k, v, log_g, chunk_size=8)
        custom = torch.ops.llmtrain.power_retention_fwd(q, k, v, log_g, None, None, 2, 8 ** -0.5, 8, False)[0]
    else:
        h = torch.randn(9, 16, generator=rng, requires_grad=True)
        w = torch.randn(11, 16, generator=rng, requires_grad=True)
        t = torch.randint(0, 11, (9,), generator=rng)
        inputs = (h, w)
        eager = linear_cross_entropy(h, w, t, reduction="sum", chunk_rows=4)
        custom = torch.ops.llmtrain.linear_ce_fwd(h, w, t, -100, 4, True)[0]
    names = _node_names(eager)
    assert any(n.endswith("FunctionBackward") for n in names), names  # not the custom op's autograd node
    assert torch.equal(eager, custom)
    for a, b_ in zip(_grads(eager, inputs), _grads(custom, inputs)):
        assert torch.equal(a, b_)
