"""The state part of the retention gradient (J_phi^T (S g)) in the kernels' current form and in the
planned GEMM form (slabs of triangle rows, mirrored state rows, no per-row contraction): both equal
autograd through the canonical feature map in float64, and the GEMM form with bf16 operands stays
within the kernels' error budget."""

import math

import pytest
import torch

from llmtrain.ops.power_retention import reference as R


def _inputs(m, d, e, seed):
    gen = torch.Generator().manual_seed(seed)
    D = R.feature_dim(d)
    S = torch.randn(D, e, generator=gen, dtype=torch.float64)
    g = torch.randn(m, e, generator=gen, dtype=torch.float64)
    x = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return S, g, x


def _autograd(S, g, x):
    x = x.clone().requires_grad_(True)
    ((R.sym_power_features(x) @ S) * g).sum().backward()
    return x.grad


@pytest.mark.parametrize("d,G", [(16, 8), (32, 8), (64, 8), (64, 4), (32, 3)])
def test_both_forms_match_autograd(d, G):
    S, g, x = _inputs(37, d, d + 8, seed=d + G)
    ref = _autograd(S, g, x)
    direct = R.state_query_grad(S, g, x)
    slabs = R.state_query_grad_slabs(S, g, x, rows_per_slab=G)
    scale = ref.norm()
    assert (direct - ref).norm() / scale < 1e-12
    assert (slabs - ref).norm() / scale < 1e-12


def test_bf16_operands_error_budget():
    """bf16 A (x_a g_c) and B (state rows) operands, float accumulation: the error the GEMM form
    would add is within a few bf16 units, well inside the tests' 1e-2."""
    S, g, x = _inputs(64, 64, 72, seed=7)
    ref = R.state_query_grad(S, g, x)
    got = R.state_query_grad_slabs(S.float(), g.float(), x.float(), operand_dtype=torch.bfloat16).double()
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0 < err < 4 * 2.0 ** -8, err


def test_slab_form_checks_the_state_size():
    S, g, x = _inputs(4, 8, 9, seed=1)
    with pytest.raises(ValueError, match="canonical map"):
        R.state_query_grad_slabs(S[:-1], g, x)
    assert math.isfinite(R.state_query_grad_slabs(S, g, x).norm().item())
