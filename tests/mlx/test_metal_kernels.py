"""The Metal kernels, checked on Linux on the exact MSL that MLX generates for them:

1. clang's C++ for OpenCL front end type-checks every kernel configuration (address spaces
   included) — skipped only when neither the clang executable nor the libclang wheel is present;
2. the C++20 execution harness (tests/mlx/msl_harness) runs the ops' whole Metal path — kernels
   plus the MLX glue — and the results are compared with the float64 references;
3. the same under ThreadSanitizer, which must report nothing (and does report a removed barrier).
"""

from __future__ import annotations

import contextlib
import shutil
import types

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from llmtrain.mlx.ops import RetentionState, power_retention, power_retention_step, rmsnorm_linear  # noqa: E402
from llmtrain.mlx.ops import _kernels as K  # noqa: E402

from .common import assert_close, cotangents, retention_inputs, retention_reference, rmsnorm_linear_reference  # noqa: E402
from .msl_harness import harness as H  # noqa: E402

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")


# ---------------------------------------------------------------------------------------------
# Every kernel configuration the ops launch, recorded without running them
# ---------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.launches = {}

    def __call__(self, spec, inputs):
        self.launches.setdefault(spec.name, (spec, [mx.array(np.zeros(x.shape, np.float32)).astype(x.dtype) for x in inputs]))
        return [mx.zeros(s, dt) for s, dt in zip(spec.output_shapes, spec.output_dtypes)]


def _drive_all_ops(dtype):
    """Call every op and its gradient on the Metal path so that every kernel body is launched."""
    rng = np.random.default_rng(0)
    b, t, hq, hk, d = 1, 9, 4, 2, 8
    D = d * (d + 1) // 2
    q, k, v = (mx.array(rng.standard_normal((b, t, h, d)).astype(np.float32)).astype(dtype) for h in (hq, hk, hk))
    lg = mx.array(-rng.uniform(0, 0.2, (b, t, hk)).astype(np.float32))
    S0, z0 = mx.zeros((b, hk, D, d)), mx.ones((b, hk, D))

    def loss(q, k, v, lg, S0, z0):
        y, st = power_retention(q, k, v, lg, chunk_size=4, initial_state=RetentionState(S0, z0), return_state=True)
        return y.astype(mx.float32).sum() + st.state.sum()

    mx.eval(mx.grad(loss, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, lg, S0, z0))
    mx.eval(power_retention_step(q[:, :1], k[:, :1], v[:, :1], lg[:, :1], state=RetentionState(S0, z0)))
    x = mx.array(rng.standard_normal((5, 24)).astype(np.float32)).astype(dtype)
    g, w, bias = mx.ones((24,), dtype), mx.ones((10, 24), dtype), mx.zeros((10,), dtype)
    mx.eval(mx.grad(lambda x, g, w, bias: rmsnorm_linear(x, g, w, bias).astype(mx.float32).sum(), argnums=(0, 1, 2, 3))(x, g, w, bias))


@pytest.fixture(scope="module")
def all_launches():
    rec = _Recorder()
    old = K.set_executor(rec)
    K.set_backend("metal")
    try:
        for dt in (mx.float32, mx.float16, mx.bfloat16):
            _drive_all_ops(dt)
    finally:
        K.set_executor(old)
        K.set_backend(None)
    return list(rec.launches.values())


def test_every_kernel_body_is_launched(all_launches):
    bodies = {spec.body for spec, _ in all_launches}
    on_disk = {p.name for p in K.metal_dir().glob("*.metal")}
    assert bodies == on_disk, f"kernels not exercised: {on_disk - bodies}"


def test_metal_is_absent_here_and_kernels_fail_cleanly():
    if mx.metal.is_available():
        pytest.skip("a Metal device is present")
    spec = K.rms_rstd_spec(N=2, K=32, eps=1e-6, dtype=mx.float32)
    with pytest.raises(RuntimeError, match="Metal"):
        mx.eval(K.metal_run(spec, [mx.ones((2, 32))])[0])
    assert K.backend() == "mlx"


# ---------------------------------------------------------------------------------------------
# 1. clang (C++ for OpenCL) syntax and type check of the generated MSL
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["clang", "libclang"])
def clang_tool(request):
    if request.param not in H.clang_tools():
        pytest.skip(f"{request.param} not installed (apt-get install clang / pip install libclang)")
    return request.param


def test_generated_msl_passes_clang(all_launches, clang_tool):
    failures = []
    for spec, inputs in all_launches:
        msl = H.generated_msl(spec, inputs)
        assert "[[kernel]] void custom_kernel_" in msl and spec.source.strip()[:40] in msl
        ok, diag = H.syntax_check(msl, clang_tool)
        if not ok:
            failures.append(f"{spec.name}:\n{diag}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("bad, why", [
    ("threadgroup float t[4];\nt[0] = x[0];\nconst device float* p = t;\nout[0] = p[0];", "address space"),
    ("out[0] = x[0] + undefined_name;", "undeclared"),
    ("x[0] = 1.0f;\nout[0] = x[0];", "const"),
])
def test_clang_check_catches_msl_errors(clang_tool, bad, why):
    spec = K.KernelSpec("llmtrain_bad", "unused", ("x",), ("out",), (), mx.float32, (1, 1, 1), (1, 1, 1), ((8,),), (mx.float32,))
    object.__setattr__(spec, "__class__", type("S", (K.KernelSpec,), {"source": property(lambda s: bad),
                                                                      "header": property(lambda s: "")}))
    msl = H.generated_msl(spec, [mx.zeros((8,))])
    ok, diag = H.syntax_check(msl, clang_tool)
    assert not ok, f"clang accepted a kernel with a {why} error"


# ---------------------------------------------------------------------------------------------
# 2. Execution harness: the Metal path end to end against the float64 references
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _real_metal():
    K.set_backend("metal")
    try:
        yield types.SimpleNamespace(launches=[])
    finally:
        K.set_backend(None)


def _retention_case(inp, cot, chunk, with_state, tol, sanitize=False, grads=True, device=False):
    names = [n for n in ("q", "k", "v", "lg", "S0", "z0") if inp[n] is not None]
    y_ref, S_ref, z_ref, g_ref = retention_reference(inp, cot, with_state=with_state)

    def run(*arrays):
        f = dict(inp)
        f.update(dict(zip(names, arrays)))
        init = RetentionState(f["S0"], f["z0"]) if f["S0"] is not None else None
        return power_retention(f["q"], f["k"], f["v"], f["lg"], chunk_size=chunk, initial_state=init,
                               return_state=with_state)

    def loss(*arrays):
        o = run(*arrays)
        if not with_state:
            return (o * mx.array(cot["dy"])).sum()
        return ((o[0] * mx.array(cot["dy"])).sum() + (o[1].state * mx.array(cot["dS"])).sum()
                + (o[1].sum_of_keys * mx.array(cot["dz"])).sum())

    arrays = [mx.array(inp[n]) for n in names]
    with (_real_metal() if device else H.metal_through_harness(sanitize=sanitize)) as ex:
        out = run(*arrays)
        mx.eval(out)
        g = mx.grad(loss, argnums=tuple(range(len(names))))(*arrays) if grads else None
        if g is not None:
            mx.eval(g)
    y = out[0] if with_state else out
    assert_close(y, y_ref, tol, "y")
    if with_state:
        assert_close(out[1].state, S_ref, tol, "state")
        assert_close(out[1].sum_of_keys, z_ref, tol, "sum_of_keys")
    if g is not None:
        for n, gg in zip(names, g):
            assert_close(gg, g_ref[n], 5 * tol, f"d{n}", floor=0.1)
    return ex.launches


@needs_gxx
def test_harness_retention_gated_gqa_initial_state_multi_chunk():
    inp = retention_inputs(11, 2, 11, 4, 2, 8, True, True)
    launches = _retention_case(inp, cotangents(11, inp), 4, True, 2e-5)
    assert {"power_retention_scan.metal", "power_retention_fwd.metal", "power_retention_bwd.metal"} <= set(launches)


@needs_gxx
def test_harness_retention_plain_single_chunk():
    inp = retention_inputs(12, 1, 6, 3, 3, 16, False, False)
    launches = _retention_case(inp, cotangents(12, inp), None, False, 2e-5)
    assert "power_retention_scan.metal" not in launches  # one chunk, no state: nothing to scan


@needs_gxx
def test_harness_decode_step():
    inp = retention_inputs(13, 2, 3, 4, 1, 8, True, True)
    a = {n: mx.array(x) for n, x in inp.items()}
    y_ref, S_ref, z_ref, _ = retention_reference(inp, cotangents(13, inp), with_state=True)
    with H.metal_through_harness() as ex:
        y, st = power_retention_step(a["q"], a["k"], a["v"], a["lg"], state=RetentionState(a["S0"], a["z0"]))
        mx.eval(y, st)
    assert ex.launches == ["power_retention_step.metal"]
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(st.state, S_ref, 2e-5, "state")
    assert_close(st.sum_of_keys, z_ref, 2e-5, "sum_of_keys")


@needs_gxx
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_harness_retention_low_precision_storage(dtype):
    inp = retention_inputs(14, 1, 7, 2, 1, 8, True, False)
    y_ref = retention_reference(inp, cotangents(14, inp), with_state=False)[0]
    dt = getattr(mx, dtype)
    with H.metal_through_harness():
        y = power_retention(*(mx.array(inp[n]).astype(dt) for n in ("q", "k", "v")), mx.array(inp["lg"]), chunk_size=4)
        mx.eval(y)
    assert y.dtype == dt
    assert_close(y.astype(mx.float32), y_ref, 3e-2, dtype)


def _rms_case(n, k, m, bias, sanitize=False):
    rng = np.random.default_rng(n * k + m)
    x = rng.standard_normal((n, k)).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32) if bias else None
    dy = rng.standard_normal((n, m)).astype(np.float32)
    y_ref, g_ref = rmsnorm_linear_reference(x, g, w, b, dy)
    args = [mx.array(a) for a in (x, g, w, b) if a is not None]

    def loss(*a):
        return (rmsnorm_linear(*a[:3], a[3] if bias else None) * mx.array(dy)).sum()

    with H.metal_through_harness(sanitize=sanitize) as ex:
        y = rmsnorm_linear(*args[:3], args[3] if bias else None)
        grads = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
        mx.eval(y, grads)
    assert_close(y, y_ref, 1e-5, "y")
    for name, gg, gr in zip(("dx", "dg", "dw", "db"), grads, g_ref):
        assert_close(gg, gr, 1e-5, name)
    return ex.launches


@needs_gxx
def test_harness_rmsnorm_linear():
    launches = _rms_case(20, 40, 24, True)  # sizes not multiples of the 16 x 16 tiles
    assert set(launches) == {"rmsnorm_rstd.metal", "rmsnorm_linear_gemm.metal", "rmsnorm_linear_bwd_rows.metal"}


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs an Apple GPU (macOS)")
@pytest.mark.parametrize("d", [32, 64])
def test_real_metal_device_matches_reference(d):
    """On a Mac: the real Metal kernels, end to end, against the float64 reference."""
    inp = retention_inputs(21, 2, 70, 4, 2, d, True, True)
    _retention_case(inp, cotangents(21, inp), None, True, 5e-5, device=True)


# ---------------------------------------------------------------------------------------------
# 3. ThreadSanitizer
# ---------------------------------------------------------------------------------------------


@needs_gxx
def test_tsan_reports_nothing_on_the_kernels():
    inp = retention_inputs(15, 1, 6, 2, 1, 6, True, True)
    _retention_case(inp, cotangents(15, inp), 4, True, 2e-5, sanitize=True)
    with H.metal_through_harness(sanitize=True):
        a = {n: mx.array(x) for n, x in inp.items()}
        mx.eval(power_retention_step(a["q"][:, :2], a["k"][:, :2], a["v"][:, :2], a["lg"][:, :2],
                                     state=RetentionState(a["S0"], a["z0"])))
    _rms_case(5, 40, 18, True, sanitize=True)


@needs_gxx
def test_tsan_catches_a_missing_barrier():
    spec = K.rms_rstd_spec(N=2, K=256, eps=1e-6, dtype=mx.float32)  # 4 simdgroups share `part`
    x = mx.ones((2, 256))
    msl = H.generated_msl(spec, [x])
    assert msl.count("threadgroup_barrier(") == 1
    broken = msl.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    with pytest.raises(H.HarnessError, match="data race"):
        H.execute(spec, [x], sanitize=True, msl=broken)
