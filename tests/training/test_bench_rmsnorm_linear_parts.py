"""bench/rmsnorm_linear_parts.py: its statistics, kernel-trace splitting and tables (CPU), and a clear
exit without CUDA. The measurements themselves run on the device machine (RMS_PLAN=parts)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
CUTLASS = "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int, int>, X>>(X::Params)"
ROW = "void llmtrain::rmslin::fast::row_bwd_s8<__nv_bfloat16, 8, 1>(__nv_bfloat16 const*, float*, int)"
PREP = "void llmtrain::rmslin::fast::prep_fwd_s8<__nv_bfloat16, 8, 2, false>(__nv_bfloat16 const*, int)"
FILL = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, std::array<char*, 1ul> >" \
    "(int, at::native::FillFunctor<int>, std::array<char*, 1ul>)"


@pytest.fixture(scope="module")
def parts():
    return load_bench_script("rmsnorm_linear_parts")


def test_loads_this_trees_script(parts):
    assert Path(parts.__file__).resolve() == ROOT / "bench" / "rmsnorm_linear_parts.py"


def test_percentiles_match_numpys_linear_rule(parts):
    np = pytest.importorskip("numpy")
    values = [0.71, 1.02, 0.70, 0.69, 1.40, 0.72, 0.70, 0.98, 0.73, 0.70, 0.69]
    st = parts.summarize(values)
    assert st["n"] == 11 and st["min"] == 0.69 and st["max"] == 1.40
    for key, q in (("p10", 10), ("median", 50), ("p90", 90)):
        assert st[key] == pytest.approx(float(np.percentile(values, q)))
    assert st["slow"] == pytest.approx(3 / 11)  # 1.02, 1.40 and 0.98 are more than 1.25x 0.69
    assert parts.percentile([5.0], 0.9) == 5.0
    assert parts.summarize([])["median"] is None and parts.summarize([])["n"] == 0


def test_markdown_table_cells(parts):
    text = parts.markdown_table(["case", "a", "b"], [["x", 0.12345, None], ["y", 3, "7%"]], digits=2)
    assert text.splitlines() == ["| case | a | b |", "|---|---|---|", "| x | 0.12 | - |", "| y | 3 | 7% |"]
    cells = parts.stats_cells([1.0, 2.0, 3.0])
    assert len(cells) == len(parts.STATS_HEADERS) and cells[0] == 3 and cells[3] == 2.0 and cells[-1] == "67%"


@pytest.mark.parametrize("name, want", [
    (CUTLASS, "device_kernel<GemmUniversal>"),
    (ROW, "row_bwd_s8<__nv_bfloat16>"),
    (FILL, "vectorized_elementwise_kernel<FillFunctor>"),
    ("void at::native::(anonymous namespace)::cuComputeGradInput<c10::BFloat16, float>(int)",
     "cuComputeGradInput<BFloat16>"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT"),
])
def test_short_kernel_names(parts, name, want):
    assert parts.short_name(name) == want


def fake_trace(parts, slow_row_pass_from=None, iterations=4):
    """Kernels as the profiler would list them: [flush] prep GEMM [marker] dgrad row wgrad per iteration,
    2 us launch gaps; the row pass takes 200 us instead of 100 from iteration slow_row_pass_from on."""
    kernels, t = [], 0.0
    for i in range(iterations):
        row = 200.0 if slow_row_pass_from is not None and i >= slow_row_pass_from else 100.0
        for name, dur in ((FILL, 110.0), (PREP, 30.0), (CUTLASS, 180.0), (FILL, 2.0), (CUTLASS, 185.0),
                          (ROW, row), (CUTLASS, 170.0)):
            kernels.append(parts.Kernel(name, t, dur))
            t += dur + 2.0
    return [parts.Kernel("Memset (Device)", -50.0, 1.0)] + kernels


def test_trace_splits_into_forward_and_backward_by_position(parts):
    its = parts.split_iterations(sorted(fake_trace(parts, slow_row_pass_from=2), key=lambda k: k.start_us))
    assert len(its) == 4 and [it["flush_us"] for it in its] == [110.0] * 4  # the memset before is dropped
    fwd = parts.kernel_positions(its, "fwd")
    assert [(pos, name) for pos, name, _ in fwd] == [(0, PREP), (1, CUTLASS)]
    bwd = parts.kernel_positions(its, "bwd")
    assert [pos for pos, _, _ in bwd] == [0, 1, 2]  # the three CUTLASS GEMMs stay apart by position
    assert bwd[1][2] == [100.0, 100.0, 200.0, 200.0] and bwd[2][2] == [170.0] * 4
    span, busy = parts.span_and_busy(its[0]["bwd"])
    assert busy == 455.0 and span == pytest.approx(459.0)  # two 2 us gaps
    summary = parts.kernel_summary(its)
    assert summary["iterations"] == 4 and summary["bwd_busy_us"] == [455.0, 455.0, 555.0, 555.0]


def test_iterations_with_different_kernels_group_by_name(parts):
    its = [{"flush_us": 1.0, "fwd": [parts.Kernel("a", 0, 1.0)], "bwd": []},
           {"flush_us": 1.0, "fwd": [parts.Kernel("a", 5, 2.0), parts.Kernel("b", 7, 3.0)], "bwd": []}]
    assert parts.kernel_positions(its, "fwd") == [("-", "a", [1.0, 2.0]), ("-", "b", [3.0])]
    assert parts.kernel_positions(its, "bwd") == []


def fake_round(parts, slow):
    """One round as run_round returns it, with a slow or fast row pass and forward+backward."""
    fb = [1.05 if slow else 0.70] * 5
    block = {"gpu_ms": fb, "host_ms": [0.05] * 5, "alloc": {k: 0 for k in parts.ALLOC_KEYS},
             "pool_before": None, "pool_after": None}
    grown = dict(block, alloc={k: (1 if k == "num_device_alloc" else 0) for k in parts.ALLOC_KEYS},
                 pool_before={"reserved_current": 0, "reserved_high": 0},
                 pool_after={"reserved_current": 72 * 2**20, "reserved_high": 72 * 2**20})
    its = parts.split_iterations(fake_trace(parts, slow_row_pass_from=0 if slow else None))
    return {"t_start": 0.0, "t_end": 1.5, "do_bench": {"ours": fb[0], "eager": 0.75},
            "blocks": {"fwd+bwd ours|flush": grown if slow else block, "fwd+bwd ours|noflush": block},
            "kernels": {"ours": parts.kernel_summary(its)}}


def test_report_shows_which_round_and_kernel_doubled(parts):
    rounds = [fake_round(parts, slow) for slow in (False, True, False)]
    meta = {"shape": "16384x2048->2048", "device": "fake", "torch": "x", "iters": 5, "warmup": 1,
            "profile_iters": 4, "pool_end": {"release_threshold": 2**64 - 1, "reserved_current": 72 * 2**20,
                                             "reserved_high": 80 * 2**20, "used_current": 0, "used_high": 72 * 2**20}}
    text = parts.report(meta, rounds, {"eager": "RuntimeError: nope"})
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in text
    assert "release threshold unlimited, reserved 72 MiB" in text
    assert "graph capture failed for eager: RuntimeError: nope" in text
    assert "| do_bench fwd+bwd ours | yes | 0.700 | 1.050 | 0.700 |" in text
    row = next(line for line in text.splitlines() if "row_bwd_s8" in line)
    assert "| ours | bwd | 1 | row_bwd_s8<__nv_bfloat16> |" in row and "100.0 / 200.0 / 100.0" in row
    assert "| 1 | fwd+bwd ours flush | 0 | 1 |" in text and "0 -> 72" in text  # the slow round's allocation
    line = parts.round_line(1, rounds[1], ["ours", "eager"])
    assert line.startswith("# round 1 (") and "1.5 s): fwd+bwd ours: do_bench 1.050, events 1.050, bwd -;" in line


def test_quiet_allocators_say_so(parts):
    rounds = [fake_round(parts, False)]
    assert parts.alloc_table(rounds).startswith("no allocator activity")


def test_bad_shape_is_refused(parts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parts.main(["--shape", "16384,2048"])
    assert exit_info.value.code == 2
    assert "expected N,K,M" in capsys.readouterr().err


def test_without_cuda_it_says_so_and_exits(parts, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parts.main([]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "RMS_PLAN=parts" in err


def test_script_without_cuda_exits_without_a_traceback():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "rmsnorm_linear_parts.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
