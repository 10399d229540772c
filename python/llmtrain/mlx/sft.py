"""Supervised fine-tuning on MLX: ``llmtrain sft --backend mlx``.

The torch SFT (llmtrain.training.sft) with the MLX models and the MLX loop's pieces:

- the same data: examples through the chat template (llmtrain.training.posttrain_data), the same
  held-out split, padding or packing collators and the same (seed, epoch) order of examples, so a
  step sees the batch the torch SFT's step sees; torch tensors become mx arrays via numpy;
- the model from ``model_path`` (an HF dir: config.json + safetensors, from either framework) in
  float32 master weights, or a fresh ``model_size`` one without a path;
- the response-only loss: mean next-token cross entropy over positions with a label (prompt,
  system and padding positions carry -100), per micro-batch, accumulated over ``grad_accum``;
  global-norm clipping, AdamW as the MLX pretraining loop (torch's update rule), the cosine
  schedule; non-finite steps skipped;
- held-out response loss and perplexity every ``eval_interval`` steps (sum over response tokens /
  their count, as the torch SFT);
- checkpoints in the torch layout with the optimizer and RNG states (llmtrain.mlx.checkpoint), exact
  resume (the data position follows from the step), SIGTERM/SIGINT -> checkpoint and stop;
- ``<output_dir>/hf``: config.json + model.safetensors + tokenizer, loadable by torch's
  AutoModelForCausalLM.

Batches are padded to their longest example, so their shapes vary: the loss and gradient are not
compiled (``mx.compile`` would retrace per shape); the optimizer update is.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from llmtrain.mlx.blas import preload_openblas

preload_openblas()  # before mlx.core: OpenBLAS instead of the reference BLAS on Linux

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from llmtrain.mlx import checkpoint as ckpt  # noqa: E402
from llmtrain.mlx.models import MLAForCausalLM, build_model, load_pretrained  # noqa: E402
from llmtrain.mlx.trainer import MLXLoop, clear_cache, compute_dtype, make_optimizer  # noqa: E402
from llmtrain.training.logger import compute_perplexity  # noqa: E402
from llmtrain.training.posttrain_config import SFTConfig  # noqa: E402
from llmtrain.training.posttrain_loop import (  # noqa: E402
    PostTrainer, check_model, fresh_model_overrides, load_posttrain_tokenizer, require_model_dir)
from llmtrain.training.schedule import cosine_with_warmup  # noqa: E402
from llmtrain.training.sft import SFTTrainer  # noqa: E402
from llmtrain.training.trainer import _StopFlag, end_of_step  # noqa: E402

IGNORE_INDEX = -100


def to_mx_batch(batch: dict) -> dict:
    """A collated batch of int64 torch tensors -> int32 mx arrays (document_ids dropped)."""
    return {k: mx.array(v.numpy().astype(np.int32)) for k, v in batch.items()
            if k in ("input_ids", "labels", "attention_mask", "position_ids")}


def model_kwargs(model, batch: dict) -> dict:
    kwargs = {}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch and isinstance(model, MLAForCausalLM):  # retention has no positions
        kwargs["position_ids"] = batch["position_ids"]
    return kwargs


def response_loss_sum(model, batch: dict) -> tuple[mx.array, mx.array]:
    """(sum of float32 cross entropy over scored positions, their count); labels are already shifted."""
    logits = model(batch["input_ids"], **model_kwargs(model, batch)).astype(mx.float32)
    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    losses = nn.losses.cross_entropy(logits, mx.where(valid, labels, 0), reduction="none")
    return (losses * valid).sum(), valid.sum()


def response_loss(model, batch: dict) -> mx.array:
    """Mean over the response tokens (NaN without any: the step is skipped, as in the torch SFT)."""
    total, count = response_loss_sum(model, batch)
    return total / count


class MLXSFTTrainer(MLXLoop):
    """callbacks: callables(trainer) run after every optimizer step (monitoring, tests, early stops)."""

    method = "sft"
    # the torch SFT's data: same examples, split, collation and order
    setup_data = SFTTrainer.setup_data
    collate = SFTTrainer.collate
    epoch_order = PostTrainer.epoch_order
    micro_batch = PostTrainer.micro_batch
    batches_of = PostTrainer.batches_of

    def __init__(self, cfg: SFTConfig, callbacks=()):
        self._setup(cfg, callbacks)
        self.rank, self.world_size, self.is_main = 0, 1, True
        self.tokenizer = load_posttrain_tokenizer(cfg)
        self.train_items, self.eval_items = self.setup_data()
        self.model = self.build_model()
        self.model_config = self.model.config
        self.model.compute_dtype = compute_dtype(cfg, self.device)
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.steps_per_epoch = len(self.train_items) // (cfg.batch_size * cfg.grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.dataset}: {len(self.train_items)} training examples, fewer than one step "
                             f"takes (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}); lower "
                             f"batch_size or add data")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.step = 0
        if cfg.resume:
            self._resume(cfg.resume)
        self._compile()
        self._open_logger()

    def to_device(self, batch: dict) -> dict:
        return batch  # torch tensors on the CPU; converted per micro-batch

    def build_model(self):
        from llmtrain.models import create_model_config

        cfg = self.cfg
        if cfg.model_path is None:
            model = build_model(create_model_config(cfg.model_size, **fresh_model_overrides(cfg, self.tokenizer)),
                                seed=cfg.seed)
        else:
            require_model_dir(cfg.model_path)
            model = load_pretrained(cfg.model_path, dtype=mx.float32)  # float32 master weights
        check_model(model, self.tokenizer, cfg)  # the torch post-training's checks
        return model

    def _compile(self) -> None:
        self._compile_update()
        self._loss_and_grad = nn.value_and_grad(self.model, response_loss)

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self, which: str) -> None:
        path = self.out_dir if which == "latest" else Path(which)
        meta = ckpt.load_checkpoint(self.model, path, "latest" if which == "latest" else which,
                                    optimizer=self.optimizer, restore_rng=True)
        if meta.get("method") != self.method:
            raise ckpt.CheckpointError(f"{meta['path']}: a {meta.get('method')} checkpoint, not {self.method}")
        self.step = int(meta["step"])
        print(f"resumed from {meta['path']} at step {self.step}")

    def save(self) -> Path:
        meta = {"method": self.method, "config": dataclasses.asdict(self.cfg), "backend": "mlx",
                "model_config": self.model_config.to_dict()}
        path = ckpt.save_checkpoint(self.out_dir, model=self.model, optimizer=self.optimizer, step=self.step,
                                    epoch=self.step // self.steps_per_epoch, meta=meta, keep_last=self.cfg.keep_last)
        clear_cache()
        return path

    # -- loop -------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        total, count = 0.0, 0
        for batch in self.batches_of(self.eval_items, self.cfg.batch_size):
            s, n = response_loss_sum(self.model, to_mx_batch(batch))
            total += s.item()
            count += int(n.item())
        clear_cache()
        loss = total / max(1, count)
        return {"loss": loss, "perplexity": compute_perplexity(loss)}

    def _accumulate(self):
        grads, total, tokens = None, 0.0, 0.0
        for micro in range(self.cfg.grad_accum):
            batch = to_mx_batch(self.micro_batch(self.step, micro))
            loss, micro_grads = self._loss_and_grad(self.model, batch)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            mx.eval(loss, grads)  # one micro-batch's activations at a time
            total += loss.item() / self.cfg.grad_accum
            tokens += float((batch["labels"] != IGNORE_INDEX).sum().item()) / self.cfg.grad_accum
        return total, grads, tokens

    def train(self) -> dict:
        cfg = self.cfg
        bad_steps, last_loss = 0, float("nan")
        progress = None
        if cfg.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="sft (mlx)", dynamic_ncols=True)
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                lr = cosine_with_warmup(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                        total_steps=self.total_steps, min_lr=cfg.learning_rate * cfg.min_lr_ratio)
                step_loss, grads, tokens = self._accumulate()
                if not math.isfinite(step_loss):
                    del grads
                    bad_steps += 1
                    print(f"step {self.step}: non-finite loss; step skipped ({bad_steps}/{cfg.max_bad_steps})")
                    if bad_steps >= cfg.max_bad_steps:
                        raise FloatingPointError(f"{bad_steps} consecutive non-finite losses at step {self.step}: "
                                                 "lower the learning rate or check the data")
                    self.step += 1
                    continue
                bad_steps = 0
                grad_norm = self._optimizer_step(grads, lr)
                self.step += 1
                last_loss = step_loss
                if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    self.logger.log(self.step, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                                "epoch": self.step / self.steps_per_epoch,
                                                "response_tokens": tokens})
                    if progress:
                        progress.set_postfix({"loss": f"{step_loss:.3f}", "lr": f"{lr:.1e}"}, refresh=False)
                if progress:
                    progress.update(1)
                if self.eval_items and (self.step % cfg.eval_interval == 0 or self.step == self.total_steps):
                    val = self.evaluate()
                    self.logger.log(self.step, {f"val_{k}": v for k, v in val.items()})
                    if progress:
                        progress.write(f"step {self.step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in val.items()))
                if end_of_step(self, stop):
                    break
        return self._finish(progress, stop, last_loss)


def run_sft(cfg: SFTConfig, callbacks=()) -> dict:
    """``llmtrain sft --backend mlx``: fine-tune, then export ``<output_dir>/hf`` as the torch SFT does."""
    trainer = MLXSFTTrainer(cfg, callbacks)
    n = trainer.model.num_parameters()
    dtype = trainer.model.compute_dtype or mx.float32
    print(f"sft: {n / 1e6:.1f}M parameters on MLX {trainer.device} ({str(dtype).split('.')[-1]} compute); "
          f"{len(trainer.train_items)} train / {len(trainer.eval_items)} held-out "
          f"{'rows' if cfg.packing else 'examples'}; {trainer.total_steps} steps")
    summary = trainer.train()
    if not summary["interrupted"]:
        summary["model_dir"] = str(trainer.export_hf())
        print(f"metrics in {cfg.output_dir}/metrics.jsonl; model in {summary['model_dir']}")
    return summary
