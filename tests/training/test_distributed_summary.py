"""bench/distributed_summary.py: the 2-GPU check's verdicts (tolerance, resume coverage, exit code)."""

import json
from pathlib import Path

import pytest

from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def summary():
    return load_bench_script("distributed_summary")


def write_run(runs: Path, name: str, losses: dict[int, float], tok_s: float, first: int = 1) -> None:
    (runs / name).mkdir(parents=True)
    rows = [{"step": s, "loss": losses[s], "tokens_per_s": tok_s, "peak_mem_gib": 9.0}
            for s in sorted(losses) if s >= first]
    (runs / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def curve(scale: float = 1.0) -> dict[int, float]:
    return {s: (8.0 - 0.05 * s) * scale for s in range(1, 51)}


def test_agreeing_runs_pass_with_their_scaling(summary, tmp_path):
    write_run(tmp_path, "small_1gpu", curve(), 40_000)
    write_run(tmp_path, "small_ddp", curve(1.004), 74_000)  # 0.4%: inside the 1% tolerance
    write_run(tmp_path, "small_ddpweak", curve(1.3), 79_000)  # another global batch: loss not compared
    write_run(tmp_path, "small_1gpu_32k", curve(1.3), 50_000)
    write_run(tmp_path, "small_ddp_32k", curve(1.3), 96_000)
    write_run(tmp_path, "ddp_2to1", {s: v if s <= 20 else v * 1.002 for s, v in curve().items()}, 40_000)
    text, failed = summary.summarize(tmp_path)
    assert failed == []
    assert "1.85x" in text and "1.98x" in text and "1.92x" in text and "FAIL" not in text
    assert "| DDP on 2 GPUs -> 1 GPU | no |" in text  # its reference is small_ddp, 0.4% off at step 1
    write_run(tmp_path, "ddp_1to2", {s: v if s <= 20 else v * 1.002 for s, v in curve().items()}, 40_000)
    text, _ = summary.summarize(tmp_path)
    assert "| 1 GPU -> DDP on 2 GPUs | yes | 0.0" in text
    assert summary.main(["x", str(tmp_path)]) == 0


def test_drift_or_a_short_resume_fails(summary, tmp_path, capsys):
    write_run(tmp_path, "small_1gpu", curve(), 40_000)
    write_run(tmp_path, "small_fsdp1gpu", curve(), 40_000)
    drifted = curve()
    drifted[30] *= 1.02  # one step 2% off
    write_run(tmp_path, "small_fsdp", drifted, 70_000)
    write_run(tmp_path, "fsdp_1to2", {s: v for s, v in curve().items() if s <= 40}, 70_000)
    text, failed = summary.summarize(tmp_path)
    assert failed == ["small FSDP2", "resume fsdp_1to2"]
    assert "worst 2.00% at step 30" in text and "stopped at step 40" in text
    info = next(line for line in text.splitlines() if "FSDP2 on 2 GPUs against plain" in line)
    assert "worst 2.00% at step 30" in info and "PASS" not in info and "FAIL" not in info  # information only
    assert summary.main(["x", str(tmp_path)]) == 1
    assert "OUTSIDE TOLERANCE" in capsys.readouterr().out


def test_resume_without_its_reference_fails(summary, tmp_path):
    write_run(tmp_path, "ds_2to1", curve(), 40_000)  # no small_dsgpu to compare with
    _, failed = summary.summarize(tmp_path)
    assert failed == ["resume ds_2to1"]


def test_a_folder_without_runs_is_an_error(summary, tmp_path, capsys):
    assert summary.main(["x", str(tmp_path / "missing")]) == 2
    assert summary.main(["x", str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    assert summary.main(["x"]) == 2
