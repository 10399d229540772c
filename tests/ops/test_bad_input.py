"""Bad input raises a Python exception with a message; the bindings never crash (fuzzed)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmtrain.ops as ops
from llmtrain import _C
from tests.ops.retention_inputs import make_inputs


def qkv(b=2, t=5, hq=4, hk=2, d=8, dtype=torch.float32):
    return (torch.randn(b, t, hq, d, dtype=dtype), torch.randn(b, t, hk, d, dtype=dtype),
            torch.randn(b, t, hk, d, dtype=dtype))


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda q, k, v: (q.int(), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "floating-point"),
    (lambda q, k, v: (q[0], k, v), ValueError, "[batch, time, heads, dim]"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "mismatched heads"),
    (lambda q, k, v: (q, k[:, :4], v), ValueError, "k and v must be"),
    (lambda q, k, v: (q, k, v.to("meta")), ValueError, "different devices"),
    (lambda q, k, v: (q, k, [1, 2]), TypeError, "must be a torch.Tensor"),
])
def test_python_api_rejects(mutate, exc, msg):
    q, k, v = mutate(*qkv())
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        ops.power_retention(q, k, v)


def test_bad_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="deg=3"):
        ops.power_retention(q, k, v, deg=3)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.power_retention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="scale"):
        ops.power_retention(q, k, v, scale=float("inf"))
    with pytest.raises(ValueError, match="log_g must be"):
        ops.power_retention(q, k, v, torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="initial_state: expected"):
        ops.power_retention(q, k, v, initial_state=(torch.zeros(2, 2, 36, 8), torch.zeros(2, 2, 35)))
    with pytest.raises(TypeError, match="RetentionState"):
        ops.power_retention(q, k, v, initial_state=torch.zeros(3))


def test_huge_values_raise_instead_of_returning_garbage():
    q, k, v = qkv()
    with pytest.raises(FloatingPointError, match="non-finite"):
        ops.power_retention(q * 1e20, k * 1e20, v)
    with pytest.raises(FloatingPointError, match="non-finite"):
        ops.power_retention_step(q[:, :1] * 1e20, k[:, :1] * 1e20, v[:, :1])


def test_positive_log_g_overflow_is_reported():
    q, k, v = qkv(t=40)
    with pytest.raises(FloatingPointError):
        ops.power_retention(q, k, v, torch.full((2, 40, 2), 30.0), chunk_size=8)


def test_rmsnorm_linear_rejects():
    x, g, w = torch.randn(3, 8), torch.ones(8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="norm_weight must be"):
        ops.rmsnorm_linear(x, torch.ones(7), w)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rmsnorm_linear(x, g, torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias must be"):
        ops.rmsnorm_linear(x, g, w, torch.zeros(5))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.rmsnorm_linear("x", g, w)


def test_binding_messages_name_the_argument():
    q, k, v = qkv()
    y = torch.empty_like(q)
    with pytest.raises(ValueError, match="q: must be contiguous"):
        _C.power_retention_fwd(q.transpose(1, 2), k, v, None, None, None, y, None, None, 2, 0.3, 4)
    with pytest.raises(ValueError, match="y: expected dtype float32"):
        _C.power_retention_fwd(q, k, v, None, None, None, y.double(), None, None, 2, 0.3, 4)
    with pytest.raises(ValueError, match="log_g: expected shape"):
        _C.power_retention_fwd(q, k, v, torch.zeros(2, 5, 4), None, None, y, None, None, 2, 0.3, 4)
    with pytest.raises(ValueError, match="mismatched heads"):
        _C.power_retention_fwd(q[:, :, :3].contiguous(), k, v, None, None, None, y[:, :, :3].contiguous(),
                               None, None, 2, 0.3, 4)
    with pytest.raises(ValueError, match="expected a tensor supporting DLPack"):
        _C.power_retention_fwd([1.0], k, v, None, None, None, y, None, None, 2, 0.3, 4)
    with pytest.raises(ValueError, match="unsupported dtype"):
        _C.rmsnorm_linear_fwd(torch.ones(2, 3, dtype=torch.int32), torch.ones(3), torch.ones(4, 3), None,
                              torch.empty(2, 4), torch.empty(2), 1e-6)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.bool]


@st.composite
def tensor_or_none(draw, shape_hint, dtype_hint, optional=False):
    if optional and draw(st.booleans()):
        return None
    if draw(st.integers(0, 3)) == 0:  # mostly well-shaped, sometimes anything
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=5))
    else:
        shape = [s if draw(st.integers(0, 5)) else draw(st.integers(0, 5)) for s in shape_hint]
    dtype = dtype_hint if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    t = torch.ones(shape, dtype=dtype) if dtype == torch.bool else torch.randn(shape).to(dtype)
    if t.dim() >= 2 and draw(st.integers(0, 5)) == 0:
        t = t.transpose(0, -1)
    return t


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_power_retention_bindings(data):
    b, t, hq, hk, d = (data.draw(st.integers(1, 3)) for _ in range(5))
    D = d * (d + 1) // 2
    f32 = torch.float32
    args = [
        data.draw(tensor_or_none([b, t, hq, d], f32)),
        data.draw(tensor_or_none([b, t, hk, d], f32)),
        data.draw(tensor_or_none([b, t, hk, d], f32)),
        data.draw(tensor_or_none([b, t, hk], f32, optional=True)),
        data.draw(tensor_or_none([b, hk, D, d], f32, optional=True)),
        data.draw(tensor_or_none([b, hk, D], f32, optional=True)),
        data.draw(tensor_or_none([b, t, hq, d], f32)),
        data.draw(tensor_or_none([b, hk, D, d], f32, optional=True)),
        data.draw(tensor_or_none([b, hk, D], f32, optional=True)),
    ]
    deg = data.draw(st.sampled_from([2, 2, 2, 1, 0]))
    scale = data.draw(st.sampled_from([0.3, 0.0, math.nan, 1.0]))
    chunk = data.draw(st.integers(-1, 6))
    try:
        out = _C.power_retention_fwd(*args, deg, scale, chunk)
    except ValueError as e:
        assert str(e)  # a message, not a crash
    else:
        assert isinstance(out, int)
    # the backward and the step, with the same arguments reshuffled
    try:
        _C.power_retention_step(*args[:3], args[3], args[4], args[5], args[6], deg, scale)
    except ValueError as e:
        assert str(e)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_rmsnorm_linear_bindings(data):
    n, k, m = (data.draw(st.integers(1, 4)) for _ in range(3))
    f32 = torch.float32
    args = [data.draw(tensor_or_none(s, f32, optional=o)) for s, o in
            (([n, k], False), ([k], False), ([m, k], False), ([m], True), ([n, m], False), ([n], False))]
    try:
        _C.rmsnorm_linear_fwd(*args, data.draw(st.sampled_from([1e-6, -1.0, math.inf])))
    except ValueError as e:
        assert str(e)


def test_grads_do_not_crash_on_empty_time(rng):
    q, k, v, log_g, state = make_inputs(2, 0, 2, 1, 8, initial_state=True, gen=rng, requires_grad=True)
    y, st_ = ops.power_retention(q, k, v, log_g, initial_state=state, return_state=True)
    assert y.shape == (2, 0, 2, 8)
    torch.testing.assert_close(st_.state, state[0])
    (st_.state.sum() + y.sum()).backward()
    torch.testing.assert_close(state[0].grad, torch.ones_like(state[0]))


def test_nan_inputs_propagate_without_error():
    """Only finite inputs with non-finite results are an error; NaN in gives NaN out, as in torch."""
    q, k, v = qkv()
    q[0, 1, 0, 0] = float("nan")
    y = ops.power_retention(q, k, v)
    assert torch.isnan(y).any()
