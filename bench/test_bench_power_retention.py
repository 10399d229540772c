"""pytest-benchmark: llmtrain power retention vs retention 1.0.7 (chunk 128 / 1024), SDPA causal and
FLA chunk_simple_gla; bf16, deg 2, 8 heads, 65,536 tokens per batch, forward and forward+backward,
plus the decode step at batch 1 and 64.

Run on a GPU with `pytest bench/test_bench_power_retention.py --benchmark-enable`. Each benchmark
synchronises so host timing covers the device work. bench/power_retention_table.py prints the
same comparison as one table with do_bench medians and TFLOP/s.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from power_retention_table import TOKENS, inputs, make_impls  # noqa: E402

pytestmark = pytest.mark.cuda
TS = [2048, 8192, 32768, 65536]
DS = [64, 128]
IMPLS = {d: make_impls(d) for d in DS}


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("impl", list(IMPLS[64]))
@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("d", DS)
def test_forward(benchmark, d, t, impl):
    fn = IMPLS[d][impl][0]
    q, k, v, g = inputs(TOKENS // t, t, d, False)
    with torch.no_grad():
        benchmark.pedantic(_sync(lambda: fn(q, k, v, g)), rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("impl", list(IMPLS[64]))
@pytest.mark.parametrize("t", TS)
@pytest.mark.parametrize("d", DS)
def test_forward_backward(benchmark, d, t, impl):
    fn = IMPLS[d][impl][0]
    q, k, v, g = inputs(TOKENS // t, t, d, True)
    dy = torch.randn_like(q)

    def step():
        for x in (q, k, v, g):
            x.grad = None
        fn(q, k, v, g).backward(dy)

    benchmark.pedantic(_sync(step), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("d", DS)
def test_decode_step(benchmark, d, batch):
    from llmtrain.ops.power_retention.op import RetentionState, power_retention_step

    D = d * (d + 1) // 2
    q = torch.randn(batch, 1, 8, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    st = RetentionState(torch.randn(batch, 8, D, d, device="cuda") * 1e-2, torch.rand(batch, 8, D, device="cuda") + 1)
    with torch.no_grad():
        benchmark.pedantic(_sync(lambda: power_retention_step(q, k, v, state=st, inplace=True)), rounds=100,
                           warmup_rounds=10)
