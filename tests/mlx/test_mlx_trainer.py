"""End-to-end MLX pretraining on the CPU (fp32): the `llmtrain pretrain --backend mlx` path, its
checkpoints read by torch, exact resume after SIGTERM, non-finite losses."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from llmtrain.mlx.blas import preload_openblas

preload_openblas()  # effective when this module is the first to import mlx.core (see blas.py)
mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from llmtrain.mlx.trainer import MLXTrainer  # noqa: E402
from llmtrain.training import load_config  # noqa: E402

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "head_dim": 32, "intermediate_size": 128}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mlx_data"))  # the corpus is tokenised once for the module


def config(run_dir, data_dir, **overrides):
    values = dict(max_steps=8, seq_len=32, batch_size=4, eval_interval=4, eval_batches=2, log_interval=1,
                  save_interval=4, output_dir=str(run_dir), data_dir=data_dir, model_overrides=TINY,
                  sample_tokens=8, progress=False, warmup_steps=2, backend="mlx", device="cpu", dtype="fp32")
    values.update(overrides)
    return load_config("quick_start", values)


def logged(run_dir, key="loss"):
    records = map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
    return [(r["step"], r[key]) for r in records if key in r]


def test_pretrain_backend_mlx_trains_and_writes_what_torch_reads(tmp_path, data_dir, capsys):
    from llmtrain.models import RetentionLLM
    from llmtrain.training.cli import run_pretraining
    from llmtrain.training.utils import load_checkpoint

    run = tmp_path / "run"
    summary = run_pretraining(config(run, data_dir, grad_accum=2, activation_checkpointing=True))
    printed = capsys.readouterr().out
    assert "on MLX cpu" in printed and "sample: ROMEO:" in printed and "validation loss" in printed
    assert summary["step"] == 8 and not summary["interrupted"] and summary["unigram_entropy"] > 0
    losses = logged(run)
    assert [s for s, _ in losses] == list(range(1, 9))
    assert losses[-1][1] < losses[0][1] - 0.3  # it learns
    assert [s for s, _ in logged(run, "val_loss")] == [4, 8]
    assert all(np.isfinite(v) and v > 0 for _, v in logged(run, "grad_norm"))
    assert (run / "latest.txt").read_text().strip() == "checkpoint_epoch0_step8"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == [
        f"checkpoint_epoch0_step{s}{suffix}" for s in (4, 8)
        for suffix in (".safetensors", "_meta.json", "_optim.safetensors")]
    assert not list(run.glob(".*tmp*")) and (run / "loss.png").exists()

    # the checkpoint and the HF export load into the torch model and give the MLX model's logits
    from llmtrain.mlx.models import load_pretrained
    from transformers import AutoModelForCausalLM

    meta = json.loads((run / "checkpoint_epoch0_step8_meta.json").read_text())
    assert meta["framework"] == "mlx" and meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    torch_model = RetentionLLM(RetentionLLM.config_class.from_dict(meta["model_config"])).eval()
    load_checkpoint(torch_model, run, "latest")
    ids = np.random.default_rng(0).integers(0, meta["model_config"]["vocab_size"], (1, 12))
    mlx_logits = np.array(load_pretrained(run)(mx.array(ids)))
    with torch.no_grad():
        np.testing.assert_allclose(torch_model(torch.tensor(ids)).logits.numpy(), mlx_logits, rtol=1e-4, atol=1e-4)
        exported = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
        np.testing.assert_allclose(exported(torch.tensor(ids)).logits.numpy(), mlx_logits, rtol=1e-4, atol=1e-4)


def test_resume_after_sigterm_is_exact(tmp_path, data_dir):
    """Stopped by SIGTERM after step 3 (it saves and stops), resumed: the same losses step for step."""
    full = MLXTrainer(config(tmp_path / "full", data_dir, sample_tokens=1)).train()
    assert full["step"] == 8

    def stop_at_3(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = tmp_path / "part"
    summary = MLXTrainer(config(part, data_dir), callbacks=[stop_at_3]).train()
    assert summary["interrupted"] and summary["step"] == 3
    assert (part / "latest.txt").read_text().strip() == "checkpoint_epoch0_step3"
    meta = json.loads((part / "checkpoint_epoch0_step3_meta.json").read_text())
    assert {v["value"] for k, v in meta["optimizer"]["scalars"].items() if k.endswith(".step")} == {3}
    resumed = MLXTrainer(config(part, data_dir, resume="latest"))
    assert resumed.step == 3
    resumed.train()
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert logged(part, key) == logged(tmp_path / "full", key), key
    assert (part / "latest.txt").read_text().strip() == "checkpoint_epoch0_step8"


def test_non_finite_losses_stop_with_a_message(tmp_path, data_dir):
    def poison(trainer):
        embed = trainer.model.model.embed_tokens
        embed.weight = mx.full(embed.weight.shape, float("nan"))

    with pytest.raises(FloatingPointError, match="consecutive non-finite losses"):
        MLXTrainer(config(tmp_path / "run", data_dir, max_bad_steps=2), callbacks=[poison]).train()


def test_resuming_a_torch_checkpoint_explains_itself(tmp_path, data_dir):
    from llmtrain.mlx.checkpoint import CheckpointError
    from llmtrain.training import Trainer

    run = tmp_path / "run"
    Trainer(config(run, data_dir, backend="torch", max_steps=1, save_interval=1, eval_interval=1)).train()
    with pytest.raises(CheckpointError, match="not MLX's"):
        MLXTrainer(config(run, data_dir, resume="latest"))
