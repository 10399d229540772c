"""The pretraining loop: `llmtrain pretrain`.

One process per device; under torchrun each rank reads its own shard of the data. The loop:
micro-batches with autocast -> backward (gradient accumulation) -> clip -> AdamW step with the
cosine schedule; periodic evaluation, logging and atomic checkpoints; exact resume; SIGTERM/SIGINT
save a checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from llmtrain.training import checkpoint as ckpt
from llmtrain.training.backends import init_distributed, make_backend, select_backend
from llmtrain.training.config import TrainConfig, to_dict
from llmtrain.training.logger import TrainingLogger, compute_perplexity
from llmtrain.training.schedule import cosine_with_warmup


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and device.type == "cpu"):
        return None
    if cfg.dtype == "fp16":
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lm_loss(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; targets are already shifted (-100 is ignored).

    Our models take ``shift_labels`` and compute the loss chunk by chunk from the hidden states, never
    building [batch, time, vocab] logits (model config ``fused_cross_entropy: false`` turns that off);
    a model that returns no loss gets the plain cross-entropy over its logits.
    """
    out = model(input_ids, shift_labels=targets)
    if getattr(out, "loss", None) is not None:
        return out.loss
    logits = out.logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train_step(model, optimizer, batch, *, grad_clip: float = 1.0) -> float:
    """One optimizer step on one batch (input_ids, targets): the documented single-step API."""
    model.train()
    input_ids, targets = batch
    loss = lm_loss(model, input_ids, targets)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def model_flops_per_token(model_config, model, seq_len: int) -> float:
    """FLOPs per trained token: llmtrain.bench.flops's formula (6 N_matmul + the token mixer), the same one
    ``llmtrain bench train`` reports, so the training log's MFU and the bench's agree."""
    from llmtrain.bench.flops import flops_per_token

    return flops_per_token(model_config, seq_len, sum(p.numel() for p in model.parameters()))["total"]


def peak_flops(device: torch.device) -> float | None:
    from llmtrain.bench.flops import peak_flops as by_name

    return by_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


class _StopFlag:
    """Turn SIGTERM/SIGINT into a request to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def host_floats(values: list) -> list[float]:
    """float() of each value (numbers and 0-dim tensors), the tensors read back in one transfer: each
    read of a device tensor waits for everything queued on the device before it."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    read = iter(torch.stack([t.detach().to(tensors[0].device) for t in tensors]).tolist() if tensors else ())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


class StepRecord(NamedTuple):
    step: int  # the optimizer steps before this one
    loss: float
    grad_norm: float


class StepRecords:
    """Each optimizer step's loss and gradient norm, left on the device until the host needs them.

    Reading a device tensor (.item(), float()) stalls the host until the device has caught up, so it
    cannot queue the next step's kernels meanwhile: a loop that reads the loss every step is paced by
    the host. The loops add every step here and read the records back (one transfer) only at a step
    boundary that acts (a log line, an evaluation, a checkpoint, a callback, a signal, the end), or
    after max_bad_steps steps. A step with a non-finite loss was already skipped on the device
    (backend.step(skip=...)); reading replays the host's side of it: the message, the count of
    consecutive ones, the FloatingPointError when they reach max_bad_steps.
    """

    def __init__(self, max_bad_steps: int, verbose: bool, advice: str):
        self.max_bad_steps = max_bad_steps
        self.verbose = verbose
        self.advice = advice  # ends the FloatingPointError's message
        self.bad_steps = 0  # consecutive, up to the last read
        self._pending: list[tuple[int, object, object]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        self._pending.append((step, loss, grad_norm))

    def read(self) -> list[StepRecord]:
        """The steps with a finite loss since the last read, oldest first; the others are reported."""
        values = host_floats([v for _, loss, norm in self._pending for v in (loss, norm)])
        steps = [step for step, _, _ in self._pending]
        self._pending = []
        finite = []
        for step, loss, grad_norm in zip(steps, values[0::2], values[1::2]):
            if math.isfinite(loss):
                self.bad_steps = 0
                finite.append(StepRecord(step, loss, grad_norm))
                continue
            self.bad_steps += 1
            if self.verbose:
                print(f"step {step}: non-finite loss ({loss}); step skipped ({self.bad_steps}/{self.max_bad_steps})")
            if self.bad_steps >= self.max_bad_steps:
                raise FloatingPointError(f"{self.bad_steps} consecutive non-finite losses at step {step}: {self.advice}")
        return finite


def boundary_acts(trainer, stop: _StopFlag, intervals) -> bool:
    """Whether the step boundary just reached does anything (every `intervals` steps, the last step, callbacks,
    a signal), i.e. whether the loop must read its StepRecords now: each of these is skipped after a
    non-finite loss."""
    return (trainer.step == trainer.total_steps or any(trainer.step % n == 0 for n in intervals)
            or bool(trainer.callbacks) or stop.signal is not None)


def end_of_step(trainer, stop: _StopFlag) -> bool:
    """The step boundary every training loop shares: checkpoint when due (every save_interval steps
    and at the last), run the callbacks, and on a signal checkpoint and return True (stop)."""
    if trainer.step % trainer.cfg.save_interval == 0 or trainer.step == trainer.total_steps:
        trainer.save()
    for callback in trainer.callbacks:
        callback(trainer)
    if stop.signal is None:
        return False
    trainer.save()
    if getattr(trainer, "is_main", True):
        print(f"\nsignal {stop.signal}: saved a checkpoint at step {trainer.step}; resume with --resume latest")
    return True


class Trainer:
    """callbacks: callables(trainer) run after every optimizer step (monitoring, tests, early stops)."""

    def __init__(self, cfg: TrainConfig, callbacks=()):
        from llmtrain.training.data import build_pretraining_data

        self.cfg = cfg
        self.callbacks = list(callbacks)
        backend_name = select_backend(cfg.backend)
        if backend_name == "mlx":
            raise RuntimeError("backend=mlx: use llmtrain.mlx's trainer (llmtrain pretrain --backend mlx on macOS)")
        probe = torch.device("cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.rank, self.world_size, local_rank = init_distributed(probe.type)
        self.device = resolve_device(cfg, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.output_dir)
        seed_everything(cfg.seed + self.rank)

        self.data = build_pretraining_data(cfg, rank=self.rank, world_size=self.world_size)
        self.tokenizer = self.data.tokenizer
        from llmtrain.models import build_model, create_model_config

        overrides = dict(cfg.model_overrides)
        overrides.setdefault("vocab_size", self.data.vocab_size)
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self.tokenizer, key, None)
            if value is not None:
                overrides.setdefault(key, value)
        self.model_config = create_model_config(cfg.model_size, **overrides)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(self.model_config)
        if cfg.activation_checkpointing:
            # transformers >= 5.x names it activation_checkpointing_enable (the old name warns)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.to(self.device)
        self.backend = make_backend(backend_name, model, cfg, self.device, self.world_size, local_rank)
        self.model = self.backend.model
        self.module = self.backend.module
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.total_steps = cfg.total_steps(self.world_size)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world_size
        self.flops_per_token = model_flops_per_token(self.model_config, self.module, cfg.seq_len)
        self.peak = peak_flops(self.device)
        self.step = 0
        self.epoch = 0
        if cfg.resume:
            self._resume(cfg.resume)
        self.logger = TrainingLogger(self.out_dir, append=bool(cfg.resume)) if self.is_main else None
        if self.logger and cfg.resume:
            self.logger.truncate_after(self.step)

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self, which: str) -> None:
        path = self.out_dir if which == "latest" else Path(which)
        meta = ckpt.load_checkpoint(self.module, path, "latest" if which == "latest" else which, restore_rng=True)
        self.backend.weights_loaded()  # e.g. DeepSpeed refreshes its fp32 master partitions
        ckpt.load_optimizer_state(self.backend.optimizer_for_checkpoint(), meta)
        if meta.get("model_config") and meta["model_config"].get("model_type") != self.model_config.model_type:
            raise ckpt.CheckpointError(f"{meta['path']}: a {meta['model_config'].get('model_type')} model, "
                                       f"not {self.model_config.model_type}")
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        data_state = meta["data"]
        saved_world = int(meta.get("world_size", 1))
        if saved_world != self.world_size:
            # The stream position counts global steps, so it carries over to another world size as
            # long as the global batch (world size x per-rank batch) is the same.
            saved_global = data_state["config"]["batch_size"] * saved_world
            if saved_global != self.cfg.batch_size * self.world_size:
                raise ckpt.CheckpointError(
                    f"{meta['path']}: saved with {saved_world} processes x batch {data_state['config']['batch_size']}"
                    f"; resuming on {self.world_size} needs batch_size {saved_global // self.world_size} per process "
                    "to keep the global batch")
            data_state = dict(data_state, config=self.data.train.state_dict()["config"])
        self.data.train.load_state_dict(data_state)
        if self.is_main:
            print(f"resumed from {meta['path']} at step {self.step}")

    def save(self) -> Path | None:
        # every rank takes part (FSDP gathers its shards collectively); rank 0 writes
        weights, optimizer = self.backend.checkpoint_state()
        if not self.is_main:
            return None
        meta = {"config": to_dict(self.cfg), "model_config": self.model_config.to_dict(),
                "data": self.data.train.state_dict(), "world_size": self.world_size}
        return ckpt.save_checkpoint(self.out_dir, model=self.module, optimizer=optimizer, model_state=weights,
                                    step=self.step, epoch=self.epoch, meta=meta, keep_last=self.cfg.keep_last)

    # -- loop -------------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in self.data.val_batches(self.cfg.eval_batches):
            with self._autocast():
                losses.append(lm_loss(self.forward, x.to(self.device), y.to(self.device)))
        self.model.train()
        losses = host_floats(losses)
        loss = sum(losses) / max(1, len(losses))
        if self.world_size > 1:
            t = torch.tensor([loss], device=self.device)
            torch.distributed.all_reduce(t)
            loss = t.item() / self.world_size
        return loss

    def train(self) -> dict:
        cfg = self.cfg
        train_iter = iter(self.data.train)
        records = StepRecords(cfg.max_bad_steps, self.is_main,
                              "lower the learning rate, check the data, or use fp32/bf16 instead of fp16")
        last_loss = float("nan")
        progress = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", dynamic_ncols=True)
        t_last, tokens_since = time.time(), 0
        stopped_early = False
        self.model.train()
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                lr = cosine_with_warmup(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                        total_steps=self.total_steps, min_lr=cfg.learning_rate * cfg.min_lr_ratio)
                self.backend.set_lr(lr)
                step_loss = torch.zeros((), device=self.device)
                for micro in range(cfg.grad_accum):
                    x, y = next(train_iter)
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    try:
                        with self.backend.no_sync(micro == cfg.grad_accum - 1), self._autocast():
                            loss = lm_loss(self.forward, x, y)
                    except FloatingPointError as exc:  # a kernel refused to return overflowed values
                        if self.is_main:
                            print(f"step {self.step}: {exc}")
                        step_loss = step_loss + float("nan")
                        continue
                    self.backend.backward(loss)
                    step_loss += loss.detach().float() / cfg.grad_accum
                if self.world_size > 1:
                    torch.distributed.all_reduce(step_loss, op=torch.distributed.ReduceOp.AVG)
                grad_norm = self.backend.step(skip=~torch.isfinite(step_loss))
                records.add(self.step, step_loss, grad_norm)
                self.step += 1
                if progress:
                    progress.update(1)
                stop_due = cfg.stop_at_step is not None and self.step >= cfg.stop_at_step
                # read at least every max_bad_steps steps: a diverged run stops within that many of the limit
                if not (boundary_acts(self, stop, (cfg.log_interval, cfg.eval_interval, cfg.save_interval))
                        or stop_due or len(records) >= cfg.max_bad_steps):
                    continue  # nothing for the host to decide: queue the next step while the device works
                finite = records.read()
                tokens_since += len(finite) * self.tokens_per_step
                if finite:
                    last_loss = finite[-1].loss
                if not finite or finite[-1].step != self.step - 1:
                    continue  # this step's loss was not finite: no log line, evaluation or checkpoint
                step_loss, grad_norm = finite[-1].loss, finite[-1].grad_norm
                if self.is_main and (self.step % cfg.log_interval == 0 or self.step == self.total_steps):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.time() - t_last
                    tok_s = tokens_since / max(dt, 1e-9)
                    metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s}
                    if self.peak:
                        metrics["mfu"] = tok_s * self.flops_per_token / (self.peak * self.world_size)
                    if self.device.type == "cuda":
                        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    self.logger.log(self.step, metrics)
                    if progress:
                        post = {"loss": f"{step_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
                        if "mfu" in metrics:
                            post["mfu"] = f"{metrics['mfu']:.1%}"
                        progress.set_postfix(post, refresh=False)
                    t_last, tokens_since = time.time(), 0
                if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                    val = self.evaluate()
                    if self.is_main:
                        self.logger.log(self.step, {"val_loss": val, "val_perplexity": compute_perplexity(val)})
                        if progress:
                            progress.write(f"step {self.step}: val loss {val:.4f} (ppl {compute_perplexity(val):.1f})")
                if end_of_step(self, stop):
                    break
                if stop_due and self.step < self.total_steps:
                    self.save()
                    if self.is_main:
                        print(f"stop_at_step {cfg.stop_at_step}: saved a checkpoint; resume with --resume latest")
                    stopped_early = True
                    break
        if progress:
            progress.close()
        # FSDP: gather the shards (all ranks) into one plain model on rank 0 for sample() and export_hf()
        self.module = self.backend.unsharded_module()
        summary = {"step": self.step, "loss": last_loss, "interrupted": stop.signal is not None,
                   "stopped_early": stopped_early}
        if self.is_main:
            summary.update(self.logger.get_summary())
            self.logger.plot()
            self.logger.close()
        return summary

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        self.module.eval()
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
        torch.manual_seed(self.cfg.seed)
        with torch.no_grad():
            out = self.module.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                                       top_k=50, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0], skip_special_tokens=True)

    def export_hf(self, path: Path | None = None) -> Path:
        path = path or self.out_dir / "hf"
        self.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path
