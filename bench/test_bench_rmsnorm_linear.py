"""pytest-benchmark: fused RMSNorm + Linear vs eager / torch.compile / Liger / bare GEMM (bf16).

Run on a GPU with `pytest bench/test_bench_rmsnorm_linear.py --benchmark-enable`. Each benchmark
synchronises so host timing covers the device work.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rmsnorm_linear_table import ENV, SHAPES, fwd_bwd_fn, fwd_fn, gemm_fn, inputs, make_impls  # noqa: E402

pytestmark = pytest.mark.cuda
IMPLS = make_impls()


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def test_gemm_floor(benchmark, shape):
    x, g, w, dy = inputs(*shape)
    benchmark.pedantic(_sync(gemm_fn(x, w)), rounds=50, warmup_rounds=5)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def test_forward(benchmark, shape, impl, monkeypatch):
    for key, val in ENV.get(impl, {}).items():
        monkeypatch.setenv(key, val)
    x, g, w, dy = inputs(*shape)
    benchmark.pedantic(_sync(fwd_fn(IMPLS[impl], x, g, w)), rounds=50, warmup_rounds=5)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES[:1], ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
def test_forward_backward(benchmark, shape, impl, monkeypatch):
    for key, val in ENV.get(impl, {}).items():
        monkeypatch.setenv(key, val)
    x, g, w, dy = inputs(*shape)
    benchmark.pedantic(_sync(fwd_bwd_fn(IMPLS[impl], x, g, w, dy)), rounds=30, warmup_rounds=5)
