"""Training backends: who owns the optimizer step and the gradient reduction.

- ``TorchBackend``: plain PyTorch on CPU or one GPU; with several processes (torchrun) the model is
  wrapped in DistributedDataParallel. AdamW is fused on CUDA.
- ``DeepSpeedBackend``: DeepSpeed ZeRO-2 with optional CPU optimizer offload, from a JSON config;
  works in one process without the ``deepspeed`` launcher.
- The MLX backend lives in ``llmtrain.mlx`` (its own model and loop); ``select_backend`` names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def select_backend(name: str) -> str:
    if name != "auto":
        return name
    if sys.platform == "darwin" and not torch.cuda.is_available():
        try:
            import mlx.core  # noqa: F401

            return "mlx"
        except ImportError:
            pass
    return "torch"


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay matrices (embeddings, projections); not norms, gates' biases or other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TorchBackend:
    name = "torch"

    def __init__(self, model, cfg, device: torch.device, world_size: int, local_rank: int):
        self.module = model
        self.world_size = world_size
        self.model = model
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                           betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
        self.grad_clip = cfg.grad_clip
        self.grad_accum = cfg.grad_accum

    def no_sync(self, last_micro_step: bool):
        """Skip DDP's all-reduce on all but the last micro-batch of an accumulation."""
        if self.world_size > 1 and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """Clip, step, zero; returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                              self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> dict:
        return self.module.state_dict()

    def optimizer_for_checkpoint(self):
        return self.optimizer

    def weights_loaded(self) -> None:
        """Called after a checkpoint's weights were loaded into the module."""


class DeepSpeedBackend:
    """ZeRO-2 (+ CPU Adam offload when the JSON says so) through deepspeed.initialize."""

    name = "deepspeed"

    def __init__(self, model, cfg, device: torch.device, world_size: int, local_rank: int):
        try:
            import deepspeed
        except ImportError as exc:
            raise RuntimeError("backend=deepspeed needs DeepSpeed: pip install 'llmtrain[deepspeed]'") from exc
        ds_path = _resolve_ds_config(cfg.ds_config)
        try:
            ds_config = json.loads(ds_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"ds_config: cannot read {ds_path} ({exc})") from exc
        # The trainer's values win, so one YAML drives both backends.
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_config["gradient_accumulation_steps"] = cfg.grad_accum
        ds_config.pop("train_batch_size", None)
        ds_config["gradient_clipping"] = cfg.grad_clip
        ds_config.setdefault("steps_per_print", 10**9)
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
        ds_config["bf16"] = {"enabled": bool(use_bf16)}
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        if offload or device.type == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                         betas=(cfg.beta1, cfg.beta2), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                          betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
        if not dist.is_initialized():
            # one process without the launcher: DeepSpeed still wants a process group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=ds_config)
        self.model = self.engine
        self.module = self.engine.module
        self.world_size = world_size

    def no_sync(self, last_micro_step: bool):
        return contextlib.nullcontext()  # DeepSpeed accumulates and reduces at its boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # advances DeepSpeed's micro-step counter; no optimizer step

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        self.engine.zero_grad()

    def model_state(self) -> dict:
        return self.module.state_dict()

    def optimizer_for_checkpoint(self):
        # ZeRO wraps the torch optimizer, which steps flat fp32 partitions; its state_dict is the
        # plain torch one that our checkpoints store.
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def weights_loaded(self) -> None:
        # ZeRO keeps fp32 master partitions copied from the module at initialisation: refresh them.
        # (Exact for fp32 training; with bf16 the masters come back rounded to the bf16 weights.)
        restore = getattr(self.optimizer, "_restore_from_bit16_weights", None)
        if restore is not None:
            restore()


def _resolve_ds_config(name: str | None) -> Path:
    """A path as given, else the same name among the packaged presets (configs/ds_config.json)."""
    from llmtrain.training.config import configs_dir

    if not name:
        return configs_dir() / "ds_config.json"
    path = Path(name)
    if path.exists():
        return path
    packaged = configs_dir() / path.name
    return packaged if packaged.exists() else path


def make_backend(name: str, model, cfg, device, world_size, local_rank):
    if name == "auto":  # a torch model is in hand here: MLX runs were dispatched earlier
        name = "torch"
    if name == "torch":
        return TorchBackend(model, cfg, device, world_size, local_rank)
    if name == "deepspeed":
        return DeepSpeedBackend(model, cfg, device, world_size, local_rank)
    if name == "mlx":
        raise RuntimeError("backend=mlx runs through llmtrain.mlx (install mlx; macOS or mlx[cpu] on Linux)")
    raise ValueError(f"unknown backend {name!r}")
