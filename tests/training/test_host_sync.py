"""The training loops read the loss and the gradient norm on the host only at the steps that act on them
(log lines, evaluations, checkpoints, callbacks, the end), not every step, so that on a GPU the host can
queue the next step while the device runs this one (issue 13). On the CPU: the logged numbers are the
ones the old every-step read gave, the reads happen at those steps only, and non-finite losses are still
skipped, reported and counted."""

import json
import math
from collections import Counter

import pytest
import torch

from llmtrain.bench.train import RandomTokenData, _random_data
from llmtrain.training.backends import param_groups
from llmtrain.training.config import TrainConfig
from llmtrain.training.schedule import cosine_with_warmup
from llmtrain.training.trainer import Trainer, host_floats, lm_loss

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32, intermediate_size=128,
            vocab_size=128)
HOST_READS = ("item", "__float__", "__bool__", "__int__", "tolist")


def make_trainer(tmp_path, fused: bool, **overrides) -> Trainer:
    values = dict(model_size="tiny", model_overrides=TINY, dataset="random", device="cpu", dtype="fp32", seq_len=16,
                  batch_size=2, grad_accum=2, max_steps=7, num_tokens=None, warmup_steps=2, learning_rate=3e-3,
                  log_interval=3, eval_interval=4, eval_batches=2, save_interval=10**9, progress=False,
                  output_dir=str(tmp_path))
    values.update(overrides)
    cfg = TrainConfig(**values).validate()
    with _random_data(RandomTokenData(TINY["vocab_size"], cfg.batch_size, cfg.seq_len, seed=0)):
        trainer = Trainer(cfg)
    if fused:
        # what the GPUs run: a fused AdamW, which skips a non-finite step on the device (it has CPU kernels too)
        trainer.backend.optimizer = torch.optim.AdamW(
            param_groups(trainer.module, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
            eps=1e-8, fused=True)
    return trainer


def poison(trainer: Trainer, steps) -> None:
    """The training loss of the given steps (counted from 0, as trainer.step before the step) becomes NaN."""
    forward = trainer.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step in steps and torch.is_grad_enabled():
            out.loss = out.loss * float("nan")
        return out

    trainer.forward = poisoned


def every_step_read_loop(trainer: Trainer) -> tuple[dict, dict]:
    """The loop as it was: the loss and the gradient norm read on the host every step; a non-finite loss
    zeroes the gradients without an optimizer step. Returns {step: (loss, grad_norm)} at the log steps
    and {step: val_loss} at the evaluation steps."""
    cfg, total = trainer.cfg, trainer.total_steps
    data = iter(trainer.data.train)
    logged, evaluated = {}, {}
    trainer.model.train()
    for step in range(total):
        trainer.step = step
        trainer.backend.set_lr(cosine_with_warmup(step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                                  total_steps=total, min_lr=cfg.learning_rate * cfg.min_lr_ratio))
        step_loss = torch.zeros(())
        for _ in range(cfg.grad_accum):
            x, y = next(data)
            loss = lm_loss(trainer.forward, x, y)
            trainer.backend.backward(loss)
            step_loss += loss.detach().float() / cfg.grad_accum
        step_loss = step_loss.item()
        if not math.isfinite(step_loss):
            trainer.backend.optimizer.zero_grad(set_to_none=True)
            continue
        grad_norm = float(trainer.backend.step())
        if (step + 1) % cfg.log_interval == 0 or step + 1 == total:
            logged[step + 1] = (step_loss, grad_norm)
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == total:
            trainer.model.eval()
            with torch.no_grad():
                losses = [lm_loss(trainer.forward, x, y).item() for x, y in trainer.data.val_batches(cfg.eval_batches)]
            trainer.model.train()
            evaluated[step + 1] = sum(losses) / len(losses)
    return logged, evaluated


def logged_by_the_trainer(trainer: Trainer) -> tuple[dict, dict]:
    records = [json.loads(line) for line in open(trainer.out_dir / "metrics.jsonl")]
    return ({r["step"]: (r["loss"], r["grad_norm"]) for r in records if "loss" in r},
            {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(a.module.parameters(), b.module.parameters()):
        sa, sb = a.backend.optimizer.state[p], b.backend.optimizer.state[q]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def count_host_reads(monkeypatch, trainer, reads: list) -> None:
    """Append (trainer.step, method) to reads for each read of a tensor on the host."""
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            reads.append((trainer.step, _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_logged_numbers_are_the_every_step_reads(tmp_path, fused):
    trainer = make_trainer(tmp_path / "new", fused)
    summary = trainer.train()
    logged, evaluated = logged_by_the_trainer(trainer)
    reference = make_trainer(tmp_path / "old", fused)
    want_logged, want_evaluated = every_step_read_loop(reference)
    assert list(logged) == [3, 6, 7] and list(evaluated) == [4, 7]
    assert logged == want_logged and evaluated == want_evaluated  # the same floats, not just close
    assert summary["loss"]["last"] == want_logged[7][0]
    assert_same_state(trainer, reference)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_non_finite_steps_are_skipped_reported_and_left_out_of_the_log(tmp_path, fused, capsys):
    bad = {1, 4, 5}  # step 5 ends at 6, a log step: no log line there
    trainer = make_trainer(tmp_path / "new", fused, max_bad_steps=3)
    poison(trainer, bad)
    trainer.train()
    out = capsys.readouterr().out
    logged, evaluated = logged_by_the_trainer(trainer)
    reference = make_trainer(tmp_path / "old", fused)
    poison(reference, bad)
    assert (logged, evaluated) == every_step_read_loop(reference)
    assert list(logged) == [3, 7] and list(evaluated) == [4, 7]
    assert_same_state(trainer, reference)  # parameters, moments and AdamW's step count as if never stepped
    assert [line for line in out.splitlines() if "non-finite" in line] == [
        "step 1: non-finite loss (nan); step skipped (1/3)",
        "step 4: non-finite loss (nan); step skipped (1/3)",
        "step 5: non-finite loss (nan); step skipped (2/3)"]


def test_consecutive_non_finite_losses_stop_the_run_between_log_steps(tmp_path):
    """No callbacks and no log step before the limit: the loop reads every max_bad_steps steps, so the
    run still stops, naming the step at which the limit was reached."""
    trainer = make_trainer(tmp_path, True, max_steps=40, log_interval=100, eval_interval=100, max_bad_steps=3)
    poison(trainer, range(2, 40))
    with pytest.raises(FloatingPointError, match="^3 consecutive non-finite losses at step 4: "):
        trainer.train()
    assert trainer.step == 6  # read at 3 and 6 (every max_bad_steps steps)


def test_the_host_reads_device_tensors_only_at_log_steps(tmp_path, monkeypatch):
    """24 steps, a log line every 6: the host reads tensors at steps 6, 12, 18 and 24 (the end, with
    its evaluation and checkpoint) and never between them; the old loop read twice a step."""
    # the fused cross-entropy checks its targets on the host on the CPU only (a device-side assert on a GPU)
    trainer = make_trainer(tmp_path, True, max_steps=24, log_interval=6, eval_interval=24, save_interval=24,
                           model_overrides=dict(TINY, fused_cross_entropy=False))
    reads = []
    count_host_reads(monkeypatch, trainer, reads)
    trainer.train()
    monkeypatch.undo()
    # one transfer for 6 losses and norms; at 24 a second one for the evaluation's losses
    assert Counter(step for step, _ in reads) == {6: 1, 12: 1, 18: 1, 24: 2}, reads
    logged, _ = logged_by_the_trainer(trainer)
    assert list(logged) == [6, 12, 18, 24]


def test_host_floats_are_float_of_each_value():
    values = [torch.tensor(0.1), 0.1, torch.tensor(1 / 3, dtype=torch.bfloat16), torch.tensor(0.1, dtype=torch.float64),
              float("nan"), torch.tensor(float("inf"))]
    got = host_floats(values)
    want = [float(v) for v in values]
    assert got[:4] == want[:4] and math.isnan(got[4]) and got[5] == math.inf
    assert host_floats([]) == []


def test_post_training_metrics_average_like_the_every_step_reads():
    from llmtrain.training.posttrain_loop import mean_over_micro_batches

    micro = [{"loss_a": torch.tensor(0.3), "tokens": torch.as_tensor(17.0), "margin": torch.tensor(0.7, dtype=torch.bfloat16)},
             {"loss_a": torch.tensor(0.1), "tokens": torch.as_tensor(9.0), "margin": torch.tensor(-0.2, dtype=torch.bfloat16)},
             {"loss_a": torch.tensor(0.2), "tokens": torch.as_tensor(5.0), "margin": torch.tensor(0.05, dtype=torch.bfloat16)}]
    old: dict = {}
    for metrics in micro:
        for k, v in metrics.items():
            old[k] = old.get(k, 0.0) + float(torch.as_tensor(v).detach()) / len(micro)
    assert mean_over_micro_batches(micro) == old


def test_post_training_reads_device_tensors_only_at_log_steps(tmp_path, monkeypatch):
    """SFT, 2 micro-batches a step, a log line every 4 steps: reads at 4 and 8 only (the losses and
    norms, then the log step's metrics; at 8 the evaluation too). Packed rows: padded ones would add the
    model's own check of the attention mask (retention.padding_reset_offsets), a read per forward."""
    from llmtrain.training.posttrain_config import SFTConfig, load_posttrain_config
    from llmtrain.training.sft import SFTTrainer
    from tests.training.test_post_common import COMMON, base_model_dir, metrics, yes_no_sft_data

    values = dict(COMMON, model_path=str(base_model_dir()), dataset=str(yes_no_sft_data()), output_dir=str(tmp_path),
                  max_steps=8, batch_size=2, grad_accum=2, log_interval=4, eval_interval=8, save_interval=8,
                  max_eval_examples=4, packing=True)
    trainer = SFTTrainer(load_posttrain_config(SFTConfig, None, values))
    cfg = trainer.cfg
    trainer.backend.optimizer = torch.optim.AdamW(
        param_groups(trainer.module, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
        eps=1e-8, fused=True)
    trainer.micro_batch(0, 0)  # draws the epoch's order, a permutation on the CPU (.tolist() once an epoch)
    reads = []
    count_host_reads(monkeypatch, trainer, reads)
    trainer.train()
    monkeypatch.undo()
    per_step = Counter(step for step, _ in reads)
    assert set(per_step) <= {4, 8} and per_step[4] == 2, reads
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [4, 8]
