"""End-to-end pretraining on CPU: the quick start path, exact resume, signals, NaN handling."""

import json
import os
import signal

import pytest
import torch

from llmtrain.training import Trainer, load_config, train_step
from llmtrain.training.utils import load_checkpoint

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}


def config(tmp_path, **overrides):
    values = dict(max_steps=8, seq_len=32, batch_size=4, eval_interval=4, eval_batches=2, log_interval=1,
                  save_interval=4, output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"),
                  model_overrides=TINY, sample_tokens=8, progress=False, warmup_steps=2)
    values.update(overrides)
    return load_config("quick_start", values)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
            if "loss" in r]


def test_trains_and_writes_everything(tmp_path):
    trainer = Trainer(config(tmp_path))
    summary = trainer.train()
    run = tmp_path / "run"
    assert summary["step"] == 8 and not summary["interrupted"]
    assert (run / "latest.txt").read_text().strip() == "checkpoint_epoch0_step8"
    assert (run / "loss.png").exists() and (run / "metrics.jsonl").exists()
    logged = losses(run)
    assert [s for s, _ in logged] == list(range(1, 9))
    assert logged[-1][1] < logged[0][1]  # it learns
    meta = load_checkpoint(trainer.module, run, "latest")
    assert meta["step"] == 8 and meta["config"]["seq_len"] == 32
    assert 0 < trainer.data.unigram_entropy < 9.1  # ln(8192) = 9.01 bounds it
    assert isinstance(trainer.sample("ROMEO:", 5), str)
    hf = trainer.export_hf()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(hf)
    x = torch.randint(0, 100, (1, 9))
    torch.testing.assert_close(reloaded(x).logits, trainer.module(x).logits)


def test_resume_is_exact(tmp_path):
    """Killed by SIGTERM after step 3 (it saves and stops), resumed: the same losses step for step."""
    full = tmp_path / "full"
    Trainer(config(full)).train()

    def stop_at_3(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = tmp_path / "part"
    summary = Trainer(config(part), callbacks=[stop_at_3]).train()
    assert summary["interrupted"] and summary["step"] == 3
    assert (part / "run" / "latest.txt").read_text().strip() == "checkpoint_epoch0_step3"
    Trainer(config(part, resume="latest")).train()
    assert losses(part / "run") == losses(full / "run")


def test_non_finite_losses_stop_with_a_message(tmp_path):
    def poison(trainer):
        with torch.no_grad():
            trainer.module.get_input_embeddings().weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="consecutive non-finite losses"):
        Trainer(config(tmp_path, max_bad_steps=2), callbacks=[poison]).train()


def test_train_step_api():
    from llmtrain.models import RetentionLLM, create_model_config

    model = RetentionLLM(create_model_config("tiny", vocab_size=64, **TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 17))
    first = train_step(model, opt, (x[:, :-1], x[:, 1:]))
    for _ in range(5):
        last = train_step(model, opt, (x[:, :-1], x[:, 1:]))
    assert last < first
