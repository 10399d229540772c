"""The loop shared by SFT, reward-model training and DPO, and the model loading all four methods use.

A method subclasses PostTrainer and provides the data (`train_items`, `eval_items`, `collate`), the
model (`build_model`), `compute_loss(batch) -> (loss, metrics)` and `evaluate() -> metrics`. The loop
is the pretraining loop's (llmtrain.training.trainer) in epochs: backend (torch/DDP or DeepSpeed) with
gradient accumulation and clipping, cosine schedule with warmup, autocast, non-finite steps skipped,
JSONL/TensorBoard metrics, atomic checkpoints, exact resume and SIGTERM -> checkpoint and stop.

Data order is a function of (seed, epoch), so the position in the data follows from the step alone and
resuming replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from llmtrain.training import checkpoint as ckpt
from llmtrain.training.backends import init_distributed, make_backend
from llmtrain.training.logger import TrainingLogger
from llmtrain.training.schedule import cosine_with_warmup
from llmtrain.training.trainer import (StepRecords, _StopFlag, autocast_dtype, boundary_acts, end_of_step,
                                      host_floats, resolve_device, seed_everything)


# -- models and tokenizer ---------------------------------------------------------------------------

def load_posttrain_tokenizer(cfg, model_path: str | None = None):
    """cfg.tokenizer if set, else the tokenizer saved next to the model, else the bundled BPE."""
    from llmtrain.data.tokenizer import load_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    model_path = model_path or cfg.model_path
    if model_path and (Path(model_path) / "tokenizer.json").exists():
        return load_tokenizer(Path(model_path))
    return load_tokenizer()


def load_model(cfg, tokenizer, path: str | None, task: str = "causal-lm"):
    """A model from an HF dir (ours, via the Auto classes), or a fresh cfg.model_size one without a path.

    task "sequence-classification" puts a one-output score head on the backbone (reward/value models);
    loading a causal LM's dir that way keeps its backbone and initialises the head.
    """
    import llmtrain.models  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmtrain.models import build_model, create_model_config

    if path is None:
        extra = {"num_labels": 1} if task == "sequence-classification" else {}
        model = build_model(create_model_config(cfg.model_size, **fresh_model_overrides(cfg, tokenizer, **extra)),
                            task=task)
    else:
        require_model_dir(path)
        if task == "sequence-classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
    check_model(model, tokenizer, cfg)
    return model


def fresh_model_overrides(cfg, tokenizer, **defaults) -> dict:
    """cfg.model_overrides completed with the tokenizer's vocabulary size and special tokens."""
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        overrides.setdefault(key, getattr(tokenizer, key))
    for key, value in defaults.items():
        overrides.setdefault(key, value)
    return overrides


def require_model_dir(path) -> None:
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); pass the <output_dir>/hf "
                                f"of a pretraining or post-training run")


def check_model(model, tokenizer, cfg) -> None:
    """A loaded or fresh model against the tokenizer and cfg.max_length (any framework's model)."""
    if model.config.pad_token_id is None:  # the score head reads each row's last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} "
                         f"embeddings; use the tokenizer the model was trained with")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's context "
                         f"(max_position_embeddings {limit})")


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(label) at scored positions (labels already shifted; -100 unscored)."""
    scored = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * scored).sum(-1)


def model_inputs(batch: dict, prefix: str = "") -> dict:
    """The keys of a collated batch the models take (packed rows also carry position_ids)."""
    out = {"input_ids": batch[f"{prefix}input_ids"], "use_cache": False}  # training never decodes
    for key in ("attention_mask", "position_ids"):
        if f"{prefix}{key}" in batch:
            out[key] = batch[f"{prefix}{key}"]
    return out


def mean_over_micro_batches(micro_metrics: list[dict]) -> dict:
    """Each metric's mean over the micro-batches of a step (tensors read back in one transfer)."""
    keys = [k for metrics in micro_metrics for k in metrics]
    values = host_floats([v for metrics in micro_metrics for v in metrics.values()])
    mean: dict[str, float] = {}
    for k, v in zip(keys, values):
        mean[k] = mean.get(k, 0.0) + v / len(micro_metrics)
    return mean


# -- the loop ----------------------------------------------------------------------------------------

class PostTrainer:
    """Subclasses set `method` and implement setup_data, build_model, collate, compute_loss, evaluate."""

    method = "posttrain"

    def __init__(self, cfg, callbacks=()):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        probe = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.rank, self.world_size, local_rank = init_distributed(probe)
        self.device = resolve_device(cfg, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.tokenizer = load_posttrain_tokenizer(cfg)
        self.train_items, self.eval_items = self.setup_data()
        torch.manual_seed(cfg.seed)  # fresh heads initialise identically on every rank
        model = self.build_model()
        model.to(self.device)
        self.backend = make_backend(cfg.backend, model, cfg, self.device, self.world_size, local_rank)
        self.model, self.module = self.backend.model, self.backend.module
        per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        self.steps_per_epoch = len(self.train_items) // per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.dataset}: {len(self.train_items)} training examples, fewer than one step "
                             f"takes (batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x "
                             f"{self.world_size} processes); lower batch_size or add data")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.step = 0
        if cfg.resume:
            self._resume(cfg.resume)
        self.logger = TrainingLogger(self.out_dir, append=bool(cfg.resume)) if self.is_main else None
        if self.logger and cfg.resume:
            self.logger.truncate_after(self.step)

    # -- what a method provides -------------------------------------------------------------------------
    def setup_data(self) -> tuple[list, list]:
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def batches_of(self, items: list, batch_size: int):
        for start in range(0, len(items), batch_size):
            yield self.to_device(self.collate(items[start:start + batch_size]))

    def epoch_order(self, epoch: int) -> list[int]:
        """This process's item order for an epoch: a permutation seeded by (seed, epoch), split by rank."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        order = torch.randperm(len(self.train_items), generator=g).tolist()
        return order[self.rank::self.world_size]

    def micro_batch(self, step: int, micro: int) -> dict:
        epoch, within = divmod(step, self.steps_per_epoch)
        if getattr(self, "_order", (None,))[0] != epoch:
            self._order = (epoch, self.epoch_order(epoch))
        order = self._order[1]
        start = (within * self.cfg.grad_accum + micro) * self.cfg.batch_size
        return self.to_device(self.collate([self.train_items[i] for i in order[start:start + self.cfg.batch_size]]))

    # -- checkpoints -----------------------------------------------------------------------------------
    def _resume(self, which: str) -> None:
        path = self.out_dir if which == "latest" else Path(which)
        meta = ckpt.load_checkpoint(self.module, path, "latest" if which == "latest" else which, restore_rng=True)
        if meta.get("method") != self.method:
            raise ckpt.CheckpointError(f"{meta['path']}: a {meta.get('method')} checkpoint, not {self.method}")
        self.backend.weights_loaded()  # e.g. DeepSpeed refreshes its fp32 master partitions
        ckpt.load_optimizer_state(self.backend.optimizer_for_checkpoint(), meta)
        self.step = int(meta["step"])
        if self.is_main:
            print(f"resumed from {meta['path']} at step {self.step}")

    def save(self) -> Path | None:
        # every rank takes part (DeepSpeed ZeRO and FSDP gather their partitions collectively); rank 0 writes
        weights, optimizer = self.backend.checkpoint_state()
        if not self.is_main:
            return None
        meta = {"method": self.method, "config": dataclasses.asdict(self.cfg),
                "model_config": self.module.config.to_dict(), "world_size": self.world_size}
        return ckpt.save_checkpoint(self.out_dir, model=self.module, optimizer=optimizer, model_state=weights,
                                    step=self.step, epoch=self.step // self.steps_per_epoch, meta=meta,
                                    keep_last=self.cfg.keep_last)

    def export_hf(self, path: Path | None = None) -> Path:
        path = Path(path or self.out_dir / "hf")
        self.module.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    # -- the loop --------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        records = StepRecords(cfg.max_bad_steps, self.is_main, "lower the learning rate or check the data")
        last_loss = float("nan")
        progress = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc=self.method, dynamic_ncols=True)
        self.model.train()
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                lr = cosine_with_warmup(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                        total_steps=self.total_steps, min_lr=cfg.learning_rate * cfg.min_lr_ratio)
                self.backend.set_lr(lr)
                step_loss = torch.zeros((), device=self.device)
                micro_metrics = []  # each micro-batch's metrics, unread until a log line needs them
                for micro in range(cfg.grad_accum):
                    batch = self.micro_batch(self.step, micro)
                    with self.backend.no_sync(micro == cfg.grad_accum - 1), self.autocast():
                        loss, metrics = self.compute_loss(batch)
                    self.backend.backward(loss)
                    step_loss += loss.detach().float() / cfg.grad_accum
                    micro_metrics.append({k: torch.as_tensor(v).detach() for k, v in metrics.items()})
                if self.world_size > 1:
                    torch.distributed.all_reduce(step_loss, op=torch.distributed.ReduceOp.AVG)
                grad_norm = self.backend.step(skip=~torch.isfinite(step_loss))
                records.add(self.step, step_loss, grad_norm)
                self.step += 1
                if progress:
                    progress.update(1)
                # read at least every max_bad_steps steps: a diverged run stops within that many of the limit
                if not (boundary_acts(self, stop, (cfg.log_interval, cfg.eval_interval, cfg.save_interval))
                        or len(records) >= cfg.max_bad_steps):
                    continue  # nothing for the host to decide: queue the next step while the device works
                finite = records.read()
                if finite:
                    last_loss = finite[-1].loss
                if not finite or finite[-1].step != self.step - 1:
                    continue  # this step's loss was not finite: no log line, evaluation or checkpoint
                step_loss, grad_norm = finite[-1].loss, finite[-1].grad_norm
                if self.is_main and (self.step % cfg.log_interval == 0 or self.step == self.total_steps):
                    self.logger.log(self.step, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                                "epoch": self.step / self.steps_per_epoch,
                                                **mean_over_micro_batches(micro_metrics)})
                    if progress:
                        progress.set_postfix({"loss": f"{step_loss:.3f}", "lr": f"{lr:.1e}"}, refresh=False)
                if self.eval_items and (self.step % cfg.eval_interval == 0 or self.step == self.total_steps):
                    self.model.eval()
                    with torch.no_grad(), self.autocast():
                        val = self.evaluate()
                    self.model.train()
                    if self.is_main:
                        self.logger.log(self.step, {f"val_{k}": v for k, v in val.items()})
                        if progress:
                            progress.write(f"step {self.step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in val.items()))
                if end_of_step(self, stop):
                    break
        if progress:
            progress.close()
        summary = {"step": self.step, "loss": last_loss, "interrupted": stop.signal is not None}
        if self.is_main:
            summary.update(self.logger.get_summary())
            self.logger.plot()
            self.logger.close()
        return summary
