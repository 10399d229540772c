"""The DeepSpeed backend on CPU (ZeRO-2 with DeepSpeedCPUAdam, one process without the launcher):
it trains, and a resumed run reproduces the uninterrupted one. The first run builds DeepSpeed's
cpu_adam op with g++ (about 2-3 minutes on 2 cores, cached afterwards)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="the deepspeed backend is an optional extra (pip install '.[deepspeed]')")

TINY = "{num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}"


def run(tmp_path, out, *extra):
    args = ["--backend", "deepspeed", "--max_steps", "6", "--seq_len", "32", "--batch_size", "4",
            "--grad_accum", "2", "--eval_interval", "3", "--eval_batches", "1", "--save_interval", "100",
            "--warmup_steps", "2", "--sample_tokens", "1", "--progress", "false", "--log_interval", "1",
            "--output_dir", str(tmp_path / out), "--data_dir", str(tmp_path / "data"), "--model_overrides", TINY,
            *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "llmtrain", "pretrain", *args], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / out / "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
def test_deepspeed_trains_and_resumes_exactly(tmp_path):
    full = run(tmp_path, "full")
    assert [s for s, _ in full] == list(range(1, 7)) and full[-1][1] < full[0][1]
    run(tmp_path, "part", "--stop_at_step", "3")
    resumed = run(tmp_path, "part", "--resume", "latest")
    # Exact for our own backends; DeepSpeed on CPU is not bit-reproducible even between two fresh runs
    # (a 2e-6 step-3 difference seen with nothing resumed), so hold it to well below bf16 noise.
    assert [s for s, _ in resumed] == [s for s, _ in full]
    for (step, a), (_, b) in zip(resumed, full):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: resumed loss {a} vs uninterrupted {b}"
