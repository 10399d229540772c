"""The MLX pretraining loop: ``llmtrain pretrain --backend mlx`` (auto-selected on macOS).

The same TrainConfig, data pipeline, schedule, logging, checkpoint layout and summary as the torch
trainer (llmtrain.training.trainer), on the MLX models (llmtrain.mlx.models):

- ``nn.value_and_grad`` of the next-token loss, compiled with ``mx.compile`` with the model and
  optimizer state captured as inputs and outputs; one compiled function per micro-batch (the first
  returns the gradients, the others add theirs), one for the update;
- gradient accumulation (summed, then scaled by 1/grad_accum), global-norm clipping
  (``optim.clip_grad_norm``), AdamW with torch's update rule (bias correction, decoupled weight
  decay on matrices only: two AdamWs in an ``optim.MultiOptimizer``), the cosine schedule of
  llmtrain.training.schedule set before every step;
- float32 master weights; dtype auto is bfloat16 compute on the GPU (the layers cast weights to the
  activations' dtype, as torch's autocast) and float32 on the CPU;
- ``activation_checkpointing``: ``mx.checkpoint`` around every block;
- checkpoints with the optimizer state (llmtrain.mlx.checkpoint) and exact resume; SIGTERM/SIGINT
  save a checkpoint and stop at the next step boundary;
- ``mx.clear_cache()`` after evaluation, checkpointing and sampling, which allocate buffers of
  other sizes than the training step: MLX keeps freed buffers in its cache for reuse, and clearing
  it there returns them to the system without slowing the steps that follow (the steps' own buffers
  come back into the cache after the first step).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

from llmtrain.mlx.blas import preload_openblas

preload_openblas()  # before mlx.core: OpenBLAS instead of the reference BLAS on Linux

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from llmtrain.mlx import checkpoint as ckpt  # noqa: E402
from llmtrain.mlx.models import build_model, generate, save_pretrained
from llmtrain.training.config import TrainConfig, to_dict
from llmtrain.training.logger import TrainingLogger, compute_perplexity
from llmtrain.training.report import report_pretraining
from llmtrain.training.schedule import cosine_with_warmup
from llmtrain.training.trainer import _StopFlag, end_of_step, seed_everything


def clear_cache() -> None:
    """Release MLX's buffer cache (``mx.clear_cache``; ``mx.metal.clear_cache`` before MLX 0.22)."""
    if hasattr(mx, "clear_cache"):
        mx.clear_cache()
    else:  # pragma: no cover - older MLX
        mx.metal.clear_cache()


def peak_memory_bytes() -> int:
    getter = getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory
    return int(getter())


def select_device(cfg: TrainConfig) -> str:
    """Set MLX's default device from cfg.device: "cpu", or the GPU (auto / mps / cuda); returns its kind."""
    if cfg.device == "cpu":
        mx.set_default_device(mx.cpu)
        if mx.metal.is_available():  # the Metal kernels cannot run on the CPU stream
            from llmtrain.mlx.ops import set_backend

            set_backend("mlx")
        return "cpu"
    gpu = mx.is_available(mx.gpu) if hasattr(mx, "is_available") else mx.metal.is_available()
    if gpu:
        mx.set_default_device(mx.gpu)
        return "gpu"
    if cfg.device != "auto":
        raise RuntimeError(f"device={cfg.device}: MLX sees no GPU (Metal on Apple silicon, or mlx[cuda])")
    mx.set_default_device(mx.cpu)
    return "cpu"


def compute_dtype(cfg: TrainConfig, device: str):
    """The activations' dtype; None keeps the float32 weights' dtype."""
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and device == "cpu"):
        return None
    return mx.float16 if cfg.dtype == "fp16" else mx.bfloat16


def make_optimizer(cfg: TrainConfig) -> optim.MultiOptimizer:
    """torch's AdamW (bias-corrected, eps 1e-8) with weight decay on matrices only, as the torch
    trainer's parameter groups (llmtrain.training.backends.param_groups)."""
    def adamw(weight_decay):
        return optim.AdamW(learning_rate=cfg.learning_rate, betas=[cfg.beta1, cfg.beta2], eps=1e-8,
                           weight_decay=weight_decay, bias_correction=True)

    return optim.MultiOptimizer([adamw(cfg.weight_decay), adamw(0.0)], [lambda path, p: p.ndim >= 2])


def lm_loss(model, input_ids: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy in float32; targets are already shifted (-100 is ignored)."""
    logits = model(input_ids).astype(mx.float32)
    valid = targets != -100
    losses = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0), reduction="none")
    return (losses * valid).sum() / valid.sum()


def to_mx(batch) -> tuple[mx.array, mx.array]:
    """A (input_ids, targets) pair of torch int64 tensors -> int32 mx.arrays."""
    return tuple(mx.array(t.numpy().astype(np.int32)) for t in batch)


def global_norm(grads) -> mx.array:
    return optim.clip_grad_norm(grads, float("inf"))[1]


class MLXLoop:
    """What the MLX loops (pretraining here, SFT in llmtrain.mlx.sft) share: the run's setup, the
    compiled optimizer update and its step, the end of every step (periodic checkpoint, callbacks,
    SIGTERM/SIGINT), the end of a run and the Hugging Face export. A subclass sets model, optimizer,
    tokenizer, total_steps and step, and defines save()."""

    def _setup(self, cfg, callbacks) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.device = select_device(cfg)
        self.out_dir = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        mx.random.seed(cfg.seed)

    def _open_logger(self) -> None:
        self.logger = TrainingLogger(self.out_dir, append=bool(self.cfg.resume))
        if self.cfg.resume:
            self.logger.truncate_after(self.step)

    def _compile_update(self) -> None:
        """self._update(grads) -> norm: mean over micro-batches, clip, AdamW; compiled with the model and
        optimizer state (self._state) as its inputs and outputs."""
        model, optimizer, grad_clip = self.model, self.optimizer, self.cfg.grad_clip
        inv_accum = 1.0 / self.cfg.grad_accum
        self._state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def update(grads):
            if inv_accum != 1.0:
                grads = tree_map(lambda g: g * inv_accum, grads)
            if grad_clip > 0:
                grads, norm = optim.clip_grad_norm(grads, grad_clip)
            else:
                norm = global_norm(grads)
            optimizer.update(model, grads)
            return norm

        self._update = update

    def _optimizer_step(self, grads, lr: float) -> float:
        """One update at learning rate lr; returns the gradient norm before clipping."""
        self.optimizer.learning_rate = lr
        norm = self._update(grads)
        mx.eval(self._state, norm)
        return norm.item()

    def _finish(self, progress, stop, last_loss: float) -> dict:
        if progress:
            progress.close()
        summary = {"step": self.step, "loss": last_loss, "interrupted": stop.signal is not None}
        summary.update(self.logger.get_summary())
        self.logger.plot()
        self.logger.close()
        return summary

    def export_hf(self, path: Path | None = None) -> Path:
        """config.json + model.safetensors (loads in torch with AutoModelForCausalLM) and the tokenizer."""
        path = Path(path or self.out_dir / "hf")
        save_pretrained(self.model, path)
        self.tokenizer.save_pretrained(path)
        return path


class MLXTrainer(MLXLoop):
    """callbacks: callables(trainer) run after every optimizer step (monitoring, tests, early stops)."""

    def __init__(self, cfg: TrainConfig, callbacks=()):
        from llmtrain.models import create_model_config
        from llmtrain.training.data import build_pretraining_data

        self._setup(cfg, callbacks)
        self.is_main = True
        self.world_size = 1

        self.data = build_pretraining_data(cfg)
        self.tokenizer = self.data.tokenizer
        overrides = dict(cfg.model_overrides)
        overrides.setdefault("vocab_size", self.data.vocab_size)
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self.tokenizer, key, None)
            if value is not None:
                overrides.setdefault(key, value)
        self.model_config = create_model_config(cfg.model_size, **overrides)
        self.model = build_model(self.model_config, seed=cfg.seed)
        self.model.compute_dtype = compute_dtype(cfg, self.device)
        if cfg.activation_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.total_steps = cfg.total_steps()
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        self.step = 0
        self.epoch = 0
        if cfg.resume:
            self._resume(cfg.resume)
        self._compile()  # after a resume: the compiled functions capture the restored state
        self._open_logger()

    # -- compiled functions -----------------------------------------------------------------------

    def _compile(self) -> None:
        self._compile_update()
        model, state = self.model, self._state
        loss_and_grad = nn.value_and_grad(model, lm_loss)

        @partial(mx.compile, inputs=state, outputs=state)
        def first_micro_batch(x, y):
            return loss_and_grad(model, x, y)

        @partial(mx.compile, inputs=state, outputs=state)
        def next_micro_batch(x, y, grads):
            loss, micro_grads = loss_and_grad(model, x, y)
            return loss, tree_map(mx.add, grads, micro_grads)

        self._first_micro_batch, self._next_micro_batch = first_micro_batch, next_micro_batch
        self._eval_loss = mx.compile(partial(lm_loss, model), inputs=model.state)

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self, which: str) -> None:
        path = self.out_dir if which == "latest" else Path(which)
        meta = ckpt.load_checkpoint(self.model, path, "latest" if which == "latest" else which,
                                    optimizer=self.optimizer, restore_rng=True)
        if meta.get("model_config") and meta["model_config"].get("model_type") != self.model_config.model_type:
            raise ckpt.CheckpointError(f"{meta['path']}: a {meta['model_config'].get('model_type')} model, "
                                       f"not {self.model_config.model_type}")
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        self.data.train.load_state_dict(meta["data"])
        print(f"resumed from {meta['path']} at step {self.step}")

    def save(self) -> Path:
        meta = {"config": to_dict(self.cfg), "model_config": self.model_config.to_dict(),
                "data": self.data.train.state_dict(), "world_size": 1}
        path = ckpt.save_checkpoint(self.out_dir, model=self.model, optimizer=self.optimizer, step=self.step,
                                    epoch=self.epoch, meta=meta, keep_last=self.cfg.keep_last)
        clear_cache()
        return path

    # -- loop -------------------------------------------------------------------------------------

    def evaluate(self) -> float:
        losses = []
        for x, y in self.data.val_batches(self.cfg.eval_batches):
            losses.append(self._eval_loss(*to_mx((x, y))).item())
        clear_cache()
        return sum(losses) / max(1, len(losses))

    def _accumulate(self, train_iter):
        """Loss (mean over micro-batches) and summed gradients of one optimizer step."""
        grads, total = None, 0.0
        for _ in range(self.cfg.grad_accum):
            x, y = to_mx(next(train_iter))
            if grads is None:
                loss, grads = self._first_micro_batch(x, y)
            else:
                loss, grads = self._next_micro_batch(x, y, grads)
            mx.eval(loss, grads)  # one micro-batch's activations at a time
            total += loss.item() / self.cfg.grad_accum
        return total, grads

    def train(self) -> dict:
        cfg = self.cfg
        train_iter = iter(self.data.train)
        bad_steps = 0
        last_loss = float("nan")
        progress = None
        if cfg.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="pretrain (mlx)", dynamic_ncols=True)
        t_last, tokens_since = time.time(), 0
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                lr = cosine_with_warmup(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                        total_steps=self.total_steps, min_lr=cfg.learning_rate * cfg.min_lr_ratio)
                step_loss, grads = self._accumulate(train_iter)
                if not math.isfinite(step_loss):
                    del grads
                    bad_steps += 1
                    print(f"step {self.step}: non-finite loss ({step_loss}); step skipped "
                          f"({bad_steps}/{cfg.max_bad_steps})")
                    if bad_steps >= cfg.max_bad_steps:
                        raise FloatingPointError(
                            f"{bad_steps} consecutive non-finite losses at step {self.step}: lower the learning "
                            "rate, check the data, or use fp32/bf16 instead of fp16")
                    self.step += 1
                    continue
                bad_steps = 0
                grad_norm = self._optimizer_step(grads, lr)
                self.step += 1
                last_loss = step_loss
                tokens_since += self.tokens_per_step
                if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    dt = time.time() - t_last
                    tok_s = tokens_since / max(dt, 1e-9)
                    metrics = {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s}
                    if self.device == "gpu":
                        metrics["peak_mem_gib"] = peak_memory_bytes() / 2**30
                    self.logger.log(self.step, metrics)
                    if progress:
                        progress.set_postfix({"loss": f"{step_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"},
                                             refresh=False)
                    t_last, tokens_since = time.time(), 0
                if progress:
                    progress.update(1)
                if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                    val = self.evaluate()
                    self.logger.log(self.step, {"val_loss": val, "val_perplexity": compute_perplexity(val)})
                    if progress:
                        progress.write(f"step {self.step}: val loss {val:.4f} (ppl {compute_perplexity(val):.1f})")
                if end_of_step(self, stop):
                    break
        return self._finish(progress, stop, last_loss)

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        ids = self.tokenizer(prompt).input_ids
        out = generate(self.model, ids, max_new_tokens, temperature=0.8, top_k=50, seed=self.cfg.seed)
        clear_cache()
        return self.tokenizer.decode(np.array(out[0]).tolist(), skip_special_tokens=True)


def run_pretraining(cfg: TrainConfig) -> dict:
    """``llmtrain pretrain --backend mlx``: train, then report, sample and export as the torch path does."""
    trainer = MLXTrainer(cfg)
    n = trainer.model.num_parameters()
    dtype = trainer.model.compute_dtype or mx.float32
    print(f"model {cfg.model_size} ({trainer.model_config.model_type}): {n / 1e6:.1f}M parameters on MLX "
          f"{trainer.device} ({str(dtype).split('.')[-1]} compute); backend mlx; {trainer.total_steps} steps of "
          f"{trainer.tokens_per_step} tokens")
    return report_pretraining(cfg, trainer, trainer.train())
