"""Distributed code paths on CPU: torchrun with 2 gloo processes (DDP, DeepSpeed ZeRO-2), rank sharding
of the data, loss reduction, and checkpoints that resume across world sizes."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

TINY = "{num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}"


def run(tmp_path, nproc, out, *extra):
    args = ["--max_steps", "6", "--seq_len", "32", "--eval_interval", "3", "--eval_batches", "2",
            "--log_interval", "1", "--save_interval", "100", "--warmup_steps", "2", "--sample_tokens", "1",
            "--progress", "false", "--output_dir", str(tmp_path / out), "--data_dir", str(tmp_path / "data"),
            "--model_overrides", TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "llmtrain", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29600 + os.getpid() % 300), "-m", "llmtrain", "pretrain", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode in (0, 130), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / out / "metrics.jsonl")) if "loss" in r]


def close(a, b):
    return abs(a - b) < 1e-4 * max(1.0, abs(a))


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    # the same global batch of 4 sequences: 1 x 4 and 2 x 2
    single = run(tmp_path, 1, "single", "--batch_size", "4")
    assert [s for s, _ in single] == list(range(1, 7))
    # 2 DDP processes match one for steps 1-3, save at step 3; one process resumes
    run(tmp_path, 2, "two_to_one", "--batch_size", "2", "--stop_at_step", "3")
    resumed = run(tmp_path, 1, "two_to_one", "--batch_size", "4", "--resume", "latest")
    assert [s for s, _ in resumed] == list(range(1, 7))
    for (s, a), (_, b) in zip(resumed, single):
        assert close(a, b), (s, a, b)
    # saved by 1 process, resumed by 2 DDP processes (steps 4-6 on 2 processes)
    run(tmp_path, 1, "one_to_two", "--batch_size", "4", "--stop_at_step", "3")
    resumed = run(tmp_path, 2, "one_to_two", "--batch_size", "2", "--resume", "latest")
    for (s, a), (_, b) in zip(resumed[3:], single[3:]):
        assert close(a, b), (s, a, b)
    if importlib.util.find_spec("deepspeed") is None:
        return  # the optional extra; test_deepspeed_cpu.py reports the skip
    # DeepSpeed ZeRO-2 (CPU Adam) on 2 processes, saved at step 3 (each rank's optimizer partition
    # gathered into per-parameter state), resumed by DeepSpeed in one process
    ds = ("--backend", "deepspeed")
    run(tmp_path, 2, "ds_two_to_one", "--batch_size", "2", "--stop_at_step", "3", *ds)
    resumed = run(tmp_path, 1, "ds_two_to_one", "--batch_size", "4", "--resume", "latest", *ds)
    assert [s for s, _ in resumed] == list(range(1, 7))
    for (s, a), (_, b) in zip(resumed, single):
        assert close(a, b), (s, a, b)


def test_resume_with_another_global_batch_is_refused(tmp_path):
    run(tmp_path, 1, "run", "--batch_size", "4", "--stop_at_step", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29900 + os.getpid() % 90), "-m", "llmtrain", "pretrain", "--max_steps", "6", "--seq_len", "32",
         "--batch_size", "4", "--progress", "false", "--output_dir", str(tmp_path / "run"), "--data_dir",
         str(tmp_path / "data"), "--model_overrides", TINY, "--resume", "latest"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert "to keep the global batch" in proc.stdout + proc.stderr


def test_deepspeed_launchers_local_rank_argument_is_ignored(monkeypatch):
    # `deepspeed` appends --local_rank=N unless --no_local_rank; the rank comes from LOCAL_RANK
    from llmtrain.training.config import ConfigError, load_config, parse_overrides

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="^local_rank: unknown key"):
        load_config(None, parse_overrides(["--local_rank=1", "--max_steps", "1"]))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parse_overrides(["--local_rank=1", "--max_steps", "1", "--local_rank", "1"]) == {"max_steps": "1"}
