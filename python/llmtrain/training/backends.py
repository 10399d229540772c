"""Training backends: who owns the optimizer step and the gradient reduction.

- ``TorchBackend``: plain PyTorch on CPU or one GPU; with several processes (torchrun) the model is
  wrapped in DistributedDataParallel. AdamW is fused on CUDA.
- ``FSDPBackend`` (``fsdp: true`` with the torch backend): FSDP2 (``fully_shard``) per block and at the
  root, for models whose weights, gradients and AdamW state do not fit on one GPU. Checkpoints hold
  the full (unsharded) tensors in the same format as the other backends, so runs resume across world
  sizes and backends.
- ``DeepSpeedBackend``: DeepSpeed ZeRO-2 with optional CPU optimizer offload, from a JSON config;
  works in one process without the ``deepspeed`` launcher.
- The MLX backend lives in ``llmtrain.mlx`` (its own model and loop); ``select_backend`` names it.
"""

from __future__ import annotations

import contextlib
import json
import math
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

    def step(self, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Clip, step, zero; returns the gradient norm before clipping, unread on the device (reading it
        makes the host wait for the device). skip: a bool tensor, set when the step's loss was not finite:
        the parameters and the optimizer state then stay as they were."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                              self.grad_clip if self.grad_clip > 0 else float("inf"))
        optimizer_step_unless(self.optimizer, skip)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def model_state(self) -> dict:
        return self.module.state_dict()

    def optimizer_for_checkpoint(self):
        return self.optimizer

    def checkpoint_state(self):
        """(weights, optimizer) for save_checkpoint. Called on every rank, since a sharded backend
        gathers collectively; only rank 0 writes."""
        return self.model_state(), self.optimizer_for_checkpoint()

    def weights_loaded(self) -> None:
        """Called after a checkpoint's weights were loaded into the module."""

    def unsharded_module(self):
        """The model as one plain module (for sampling and export after training); called on every rank."""
        return self.module


class FSDPBackend(TorchBackend):
    """FSDP2: every block (the model's ``_no_split_modules``) is its own FSDP unit, the root holds the
    embeddings, final norm and head. On GPU with bf16 (or fp16) the blocks compute in that dtype while
    the sharded master weights, the gradient reduce-scatter and AdamW stay fp32. Gradients are
    reduce-scattered after every micro-batch (no ``no_sync``), which keeps them sharded: memory is the
    point of this backend."""

    name = "fsdp"

    def __init__(self, model, cfg, device: torch.device, world_size: int, local_rank: int):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            # one process: a 1-rank group (an in-memory store, no port) so the numerics match N ranks
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        self.module = self.model = model
        self.world_size = world_size
        self.device = device
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
        if cfg.dtype == "auto" and device.type == "cuda":
            compute = torch.bfloat16
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
        block_names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            raise RuntimeError(f"fsdp: {type(model).__name__} names no blocks to shard (_no_split_modules)")
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        # AdamW on the sharded DTensor parameters: each rank steps its own shard
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                           betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=device.type == "cuda")
        self.grad_clip = cfg.grad_clip
        self.grad_accum = cfg.grad_accum

    def no_sync(self, last_micro_step: bool):
        return contextlib.nullcontext()

    def step(self, skip: torch.Tensor | None = None) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                              self.grad_clip if self.grad_clip > 0 else float("inf"))
        optimizer_step_unless(self.optimizer, skip)
        self.optimizer.zero_grad(set_to_none=True)
        return _full(norm)

    def model_state(self) -> dict:
        return _gather_model_state(self.module)

    def optimizer_for_checkpoint(self):
        return _FullOptimizer(self.optimizer)

    def checkpoint_state(self):
        model_state = self.model_state()
        optimizer = self.optimizer_for_checkpoint()
        optimizer.gather()
        return model_state, optimizer

    def unsharded_module(self):
        """Rank 0 gets a plain copy of the model on the training device (weights only; built on the
        CPU, where its non-persistent buffers are computed, then moved); the other ranks keep the
        sharded one."""
        from llmtrain.models import build_model

        state = _gather_model_state(self.module)
        if dist.get_rank() != 0:
            return self.module
        plain = build_model(self.module.config)
        plain.load_state_dict(state)
        return plain.to(self.device).eval()


def optimizer_step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor | None) -> None:
    """optimizer.step(), unless skip (a bool tensor) is set. A fused optimizer (our AdamW on GPUs) takes
    the decision on the device: skip goes in as found_inf, the input through which torch's GradScaler
    skips steps, and the kernel leaves parameters, moments and step count unchanged. Any other
    optimizer needs the decision on the host, which waits for the device (free on the CPU)."""
    if skip is None:
        optimizer.step()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):  # the flag GradScaler checks
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():
        optimizer.step()


def _full(t):
    """A DTensor's full value (a collective: every rank calls it); other values unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _gather_model_state(module) -> dict:
    """The full state dict of an FSDP2 module. Every rank takes part in each all-gather; one tensor is
    gathered at a time and only rank 0 keeps it, on the CPU, so no rank ever holds more than one
    extra full tensor on the GPU. Tied parameters stay one tensor (save_checkpoint
    stores them once)."""
    keep = dist.get_rank() == 0
    params = dict(module.named_parameters(remove_duplicate=False))
    out, done = {}, {}
    for name, value in module.state_dict().items():
        pid = id(params[name]) if name in params else None
        if pid is not None and pid in done:
            if keep:
                out[name] = out[done[pid]]
            continue
        full = _full(value).detach()
        if keep:
            out[name] = full.cpu()
        if pid is not None:
            done[pid] = name
    return out


def _gathered(optimizer) -> dict:
    """The state gathered by the optimizer view's gather(); one process gathers on demand, several must
    have called gather() together (Backend.checkpoint_state) or rank 0 would wait for the others."""
    if optimizer._state is None:
        if dist.get_world_size() > 1:
            raise RuntimeError("a sharded optimizer's state is gathered by every rank: save through "
                               "backend.checkpoint_state() on all ranks")
        optimizer.gather()
    return optimizer._state


class _FullOptimizer:
    """What checkpoints see of an AdamW over sharded parameters: the plain torch state_dict (integer
    parameter ids, full tensors), identical to the one a single-process AdamW would save, so the
    optimizer state carries over to any world size and to the DDP / single-process backends."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._state = None

    def gather(self) -> None:
        """Collective: every rank gathers; rank 0 keeps the full tensors on the CPU."""
        keep = dist.get_rank() == 0
        sd = self.optimizer.state_dict()
        state = {}
        for pid, entry in sd["state"].items():
            full = {k: _full(v) for k, v in entry.items()}
            if keep:
                state[pid] = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in full.items()}
        self._state = {"state": state, "param_groups": sd["param_groups"]}

    def state_dict(self) -> dict:
        return _gathered(self)

    def load_state_dict(self, sd: dict) -> None:
        """Full tensors (as a checkpoint holds them, on every rank) -> this rank's shards, then load."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = {}
        for pid, entry in sd["state"].items():
            pid = int(pid)
            if pid >= len(params):
                raise ValueError(f"state for parameter {pid}, but the optimizer has {len(params)}")
            p = params[pid]
            state[pid] = {}
            for k, v in entry.items():
                if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                    # every rank holds the full tensor: cut the local shard without communication
                    v = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                          src_data_rank=None)
                state[pid][k] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


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

    def step(self, skip: torch.Tensor | None = None):
        """The engine's step, or with skip set (a bool tensor: the loss was not finite) zeroed gradients
        only; the engine steps from the host, so skip is read here. Returns DeepSpeed's gradient norm
        (a tensor or a float) unread."""
        if skip is not None and skip.item():
            self.engine.zero_grad()
            return float("nan")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    def model_state(self) -> dict:
        return self.module.state_dict()

    def checkpoint_state(self):
        optimizer = self.optimizer_for_checkpoint()
        if isinstance(optimizer, _ZeroFullOptimizer):
            optimizer.gather()
        return self.model_state(), optimizer

    def unsharded_module(self):
        return self.module

    def optimizer_for_checkpoint(self):
        if hasattr(self.optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            return _ZeroFullOptimizer(self.optimizer)
        if self.world_size > 1:
            raise RuntimeError("ds_config: checkpoints of several processes need ZeRO stage 1 or 2 "
                               "(zero_optimization.stage)")
        # no partitioning: the wrapped torch optimizer's own state_dict
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def weights_loaded(self) -> None:
        # ZeRO keeps fp32 master partitions copied from the module at initialisation: refresh them.
        # (Exact for fp32 training; with bf16 the masters come back rounded to the bf16 weights.)
        restore = getattr(self.optimizer, "_restore_from_bit16_weights", None)
        if restore is not None:
            restore()


class _ZeroFullOptimizer:
    """What checkpoints see of a ZeRO-1/2 optimizer. ZeRO flattens each parameter group into one
    buffer (parameters in its own order, with alignment padding) and each rank's torch optimizer steps
    one slice of it; rank 0's slice alone would be a partial state. Here every rank's slice is gathered
    and cut back into per-parameter tensors, in the torch AdamW layout (integer parameter ids, tensors
    of the parameter's shape), so the state does not depend on the number of processes: a checkpoint
    saved on N processes resumes on M."""

    CHUNK = 1 << 25  # elements gathered at a time: bounds the extra device memory (128 MiB in fp32)

    def __init__(self, zero):
        self.zero = zero
        self.inner = zero.optimizer
        self._state = None

    def _layout(self, i: int):
        """[(index in the param group, offset in the flat buffer, numel, shape)] in flat-buffer order."""
        z = self.zero
        order = {id(p): k for k, p in enumerate(z.bit16_groups[i])}
        flat_params = z.round_robin_bit16_groups[i]
        metas = getattr(z, "round_robin_bit16_meta", None)
        shapes = [m.shape for m in metas[i]] if metas else [p.shape for p in flat_params]
        offsets = getattr(z, "round_robin_bit16_offsets", None)
        if offsets:
            offsets = offsets[i]
        else:  # DeepSpeed without per-parameter padding: the parameters back to back
            offsets, at = [], 0
            for shape in shapes:
                offsets.append(at)
                at += math.prod(shape)
        return [(order[id(p)], off, math.prod(shape), shape) for p, off, shape in zip(flat_params, offsets, shapes)]

    def _partition(self, i: int):
        part = self.zero.single_partition_of_fp32_groups[i]
        group = self.zero.real_dp_process_group[i]
        return part, dist.get_rank(group=group), dist.get_world_size(group=group), group

    @staticmethod
    def _is_partition_tensor(v, n: int) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == n

    def gather(self) -> None:
        """Collective: every rank sends its slices; rank 0 keeps the per-parameter tensors on the CPU."""
        keep = dist.get_rank() == 0
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        state, groups, base = {}, [], 0
        for i, group in enumerate(self.inner.param_groups):
            part, rank, world, pg = self._partition(i)
            n, size = len(self.zero.bit16_groups[i]), part.numel()
            entry = self.inner.state.get(part, {})
            flats = {}
            for key in sorted(entry):  # the same order on every rank
                value = entry[key]
                if not self._is_partition_tensor(value, size):
                    continue
                out = torch.empty(world * size, dtype=value.dtype) if keep else None
                for a in range(0, size, self.CHUNK):
                    piece = value.detach()[a:a + self.CHUNK].to(comm)
                    pieces = [torch.empty_like(piece) for _ in range(world)]
                    dist.all_gather(pieces, piece, group=pg)
                    if keep:
                        for r, got in enumerate(pieces):
                            out[r * size + a:r * size + a + got.numel()] = got.cpu()
                flats[key] = out
            if keep and entry:
                scalars = {k: v for k, v in entry.items() if k not in flats}
                for k, off, numel, shape in self._layout(i):
                    state[base + k] = {key: flat[off:off + numel].view(shape).clone() for key, flat in flats.items()}
                    # a tensor step per parameter (safetensors stores no shared tensors)
                    state[base + k].update({key: v.clone() if isinstance(v, torch.Tensor) else v
                                            for key, v in scalars.items()})
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(base, base + n))})
            base += n
        self._state = {"state": state, "param_groups": groups}

    def state_dict(self) -> dict:
        return _gathered(self)

    def load_state_dict(self, sd: dict) -> None:
        """Per-parameter tensors (from any number of processes) -> this rank's slice of each flat group."""
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.inner.param_groups):
            raise ValueError(f"{len(saved_groups)} parameter groups saved, {len(self.inner.param_groups)} here")
        state, groups, base = {}, [], 0
        for i, saved in enumerate(saved_groups):
            part, rank, world, _ = self._partition(i)
            n, size = len(self.zero.bit16_groups[i]), part.numel()
            if len(saved["params"]) != n:
                raise ValueError(f"parameter group {i}: {len(saved['params'])} parameters saved, {n} here "
                                 "(or a checkpoint from before ZeRO states were stored per parameter)")
            entries = [sd["state"].get(pid) for pid in saved["params"]]
            if any(entries):
                if not all(entries):
                    raise ValueError(f"parameter group {i}: state for only some parameters")
                layout = self._layout(i)
                tensor_keys = [k for k, v in entries[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0]
                new = {k: v for k, v in entries[0].items() if k not in tensor_keys}
                for key in tensor_keys:
                    flat = torch.zeros(world * size, dtype=part.dtype)  # the alignment padding stays zero
                    for k, off, numel, shape in layout:
                        value = entries[k][key]
                        if value.numel() != numel:
                            raise ValueError(f"{key} of parameter {saved['params'][k]}: {tuple(value.shape)} saved, "
                                             f"{tuple(shape)} here")
                        flat[off:off + numel] = value.reshape(-1)
                    new[key] = flat[rank * size:(rank + 1) * size].clone()
                state[i] = new
            groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [i]})
            base += n
        self.inner.load_state_dict({"state": state, "param_groups": groups})


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
        if getattr(cfg, "fsdp", False):
            return FSDPBackend(model, cfg, device, world_size, local_rank)
        return TorchBackend(model, cfg, device, world_size, local_rank)
    if name == "deepspeed":
        return DeepSpeedBackend(model, cfg, device, world_size, local_rank)
    if name == "mlx":
        raise RuntimeError("backend=mlx runs through llmtrain.mlx (install mlx; macOS or mlx[cpu] on Linux)")
    raise ValueError(f"unknown backend {name!r}")
