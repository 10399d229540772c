"""The CPU RMSNorm+Linear kernels against the float64 reference."""

import pytest
import torch

import llmtrain.ops as ops
from llmtrain import _C
from llmtrain.ops.rmsnorm_linear import reference as R
from tests.conftest import rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make(shape, k, m, dtype, gen, bias=True):
    x = torch.randn(*shape, k, generator=gen, dtype=torch.float64).to(dtype)
    g = (1 + 0.3 * torch.randn(k, generator=gen, dtype=torch.float64)).to(dtype)
    w = (torch.randn(m, k, generator=gen, dtype=torch.float64) / k**0.5).to(dtype)
    b = torch.randn(m, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return x, g, w, b


@pytest.mark.parametrize("shape,k,m", [((1,), 8, 3), ((37,), 64, 96), ((3, 5), 128, 40), ((2, 7, 3), 48, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward(rng, shape, k, m, dtype, bias):
    x, g, w, b = make(shape, k, m, dtype, rng, bias)
    y = ops.rmsnorm_linear(x, g, w, b, eps=1e-6)
    assert y.shape == (*shape, m) and y.dtype == dtype
    assert rel_err(y, R.rmsnorm_linear(x, g, w, b, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients(rng, dtype, bias):
    x, g, w, b = make((5, 7), 64, 33, dtype, rng, bias)
    inputs = [t.requires_grad_(True) for t in (x, g, w, b) if t is not None]
    cot = torch.randn(5, 7, 33, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad((ops.rmsnorm_linear(x, g, w, b) * cot.to(dtype)).sum(), inputs)
    want = torch.autograd.grad((R.rmsnorm_linear(x, g, w, b) * cot).sum(), inputs)
    tol = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert rel_err(a, e) < tol


def test_gradcheck_float64(rng):
    x, g, w, b = make((4,), 6, 5, torch.float64, rng)
    for t in (x, g, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: ops.rmsnorm_linear(*a, eps=1e-5), (x, g, w, b))


def test_every_output_is_written(rng):
    x, g, w, b = make((19,), 32, 24, torch.float32, rng)
    y = torch.full((19, 24), float("nan"))
    rstd = torch.full((19,), float("nan"))
    _C.rmsnorm_linear_fwd(x, g, w, b, y, rstd, 1e-6)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    dy = torch.randn(19, 24, generator=rng)
    grads = [torch.full_like(t, float("nan")) for t in (x, g, w, b)]
    _C.rmsnorm_linear_bwd(x, g, w, rstd, dy, *grads, 1e-6)
    assert all(torch.isfinite(t).all() for t in grads)


def test_mixed_precision_weights(rng):
    """fp32 master weights with bf16 activations compute in bf16 and return bf16."""
    x, g, w, b = make((9,), 32, 16, torch.float32, rng)
    y = ops.rmsnorm_linear(x.bfloat16(), g, w, b)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, R.rmsnorm_linear(x.bfloat16(), g, w, b)) < 2e-2


@pytest.mark.parametrize("bias", [True, False])
def test_out_feature_padding_is_invisible(rng, monkeypatch, bias):
    """On CUDA, out_features % 8 != 0 is padded with zero weight rows so the tensor-core GEMMs apply;
    forced here on the CPU: same output (shape, values) and gradients as without, zero-row grads dropped."""
    import sys

    op = sys.modules["llmtrain.ops.rmsnorm_linear.op"]
    x, g, w, b = make((3, 5), 64, 45, torch.float64, rng, bias)
    leaves = [t.detach().requires_grad_(True) for t in (x, g, w) + ((b,) if bias else ())]
    dy = torch.randn(3, 5, 45, generator=rng, dtype=torch.float64)

    def run(pad):
        monkeypatch.setattr(op, "_out_feature_padding", lambda x, m: (-m) % 8 if pad else 0)
        ls = [t.detach().clone().requires_grad_(True) for t in leaves]
        y = ops.rmsnorm_linear(ls[0], ls[1], ls[2], ls[3] if bias else None, eps=1e-6)
        return y, torch.autograd.grad(y, ls, dy)

    y0, g0 = run(False)
    y1, g1 = run(True)
    assert y1.shape == y0.shape == (3, 5, 45)
    assert rel_err(y1, y0) < 1e-12
    for a, c in zip(g1, g0):
        assert a.shape == c.shape and rel_err(a, c) < 1e-12


def test_rstd_output_is_not_differentiable():
    """The forward op's rstd output is marked non-differentiable (its gradient is never materialized)."""
    torch.manual_seed(0)
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    y, rstd = torch.ops.llmtrain.rmsnorm_linear_fwd(x, g, w, None, 1e-6)
    assert y.requires_grad and not rstd.requires_grad
    dx, dg, dw = torch.autograd.grad(y.sum(), (x, g, w))
    ref = torch.autograd.grad(R.rmsnorm_linear(x, g, w, None, 1e-6).sum(), (x, g, w))
    for got, want in zip((dx, dg, dw), ref):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_given_dxn_is_refused_on_cpu():
    """dxn_given (grad_x holds dy . W from cuBLAS) is a CUDA-only contract: a clear error on CPU."""
    from llmtrain.ops import _native
    n, k, m = 4, 16, 8
    x, g, w = torch.randn(n, k), torch.rand(k) + 0.5, torch.randn(m, k)
    dy, rstd = torch.randn(n, m), torch.rand(n)
    dx, dg, dw = torch.mm(dy, w), torch.empty(k), torch.empty(m, k)
    with pytest.raises(ValueError, match="only supported for CUDA"):
        _C.rmsnorm_linear_bwd(*(_native.dl(t) for t in (x, g, w, rstd, dy, dx, dg, dw)), None, 1e-6, 0, True)
