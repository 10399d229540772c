"""Checkpoints: model weights in safetensors, optimizer state in safetensors + JSON, metadata in JSON.

Layout in a run directory (the documented one):

    checkpoint_epoch{e}_step{s}.safetensors        model weights
    checkpoint_epoch{e}_step{s}_optim.safetensors  optimizer tensors (+ RNG states)
    checkpoint_epoch{e}_step{s}_meta.json          step, epoch, config, data position, optimizer scalars
    latest.txt                                     name of the newest complete checkpoint

Every file is written to a temporary name and renamed into place, and latest.txt is replaced last,
so a kill at any moment leaves the previous checkpoint intact and `latest` always complete.
Nothing is unpickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint_epoch(\d+)_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- optimizer state without pickle ------------------------------------------------------------

def optimizer_state_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:  # JSON turned tuples into lists
        for key, value in g.items():
            if key != "params" and isinstance(value, list):
                g[key] = tuple(value)
    return {"state": state, "param_groups": groups}


# --- RNG states --------------------------------------------------------------------------------

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --- save / load -------------------------------------------------------------------------------

def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint_epoch{epoch}_step{step}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (weights + meta present), oldest first."""
    run_dir = Path(run_dir)
    found = []
    for meta in run_dir.glob("checkpoint_epoch*_step*_meta.json"):
        stem = meta.name[: -len("_meta.json")]
        m = _NAME.match(stem)
        if m and (run_dir / f"{stem}.safetensors").exists():
            found.append((int(m.group(2)), int(m.group(1)), run_dir / stem))
    return [p for _, _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, epoch: int, meta: dict, keep_last: int = 3,
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one checkpoint atomically, point latest.txt at it, and keep only the last `keep_last`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stem = run_dir / checkpoint_name(epoch, step)
    weights = model_state if model_state is not None else model.state_dict()
    # safetensors refuses shared storage (tied embeddings): store each storage once
    unique, seen = {}, {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t
    _atomic_save_tensors(unique, Path(f"{stem}.safetensors"), metadata={"format": "pt"})
    full_meta = dict(meta, step=step, epoch=epoch, format_version=FORMAT_VERSION,
                     aliases={n: seen[k] for n, t in weights.items()
                              if t.numel() and (k := (t.untyped_storage().data_ptr(), t.storage_offset(),
                                                      tuple(t.shape))) in seen and seen[k] != n})
    opt_tensors, rng_meta = {}, None
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_state_to_flat(optimizer)
        full_meta["optimizer"] = opt_meta
    rng_tensors, rng_meta = rng_state()
    full_meta["rng"] = rng_meta
    _atomic_save_tensors({**opt_tensors, **rng_tensors}, Path(f"{stem}_optim.safetensors"))
    _atomic_write_bytes(Path(f"{stem}_meta.json"), json.dumps(full_meta, indent=1, default=_json_default).encode())
    _atomic_write_bytes(run_dir / "latest.txt", (stem.name + "\n").encode())
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        for suffix in (".safetensors", "_optim.safetensors", "_meta.json"):
            Path(f"{old}{suffix}").unlink(missing_ok=True)
    return stem


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint stem from a run directory + "latest", a stem, or any of its files."""
    path = Path(path)
    if path.is_dir():
        if which != "latest":
            return resolve_checkpoint(path / which)
        latest = path / "latest.txt"
        if not latest.exists():
            raise CheckpointError(f"{path}: no latest.txt, so no complete checkpoint to resume from")
        return resolve_checkpoint(path / latest.read_text().strip())
    s = str(path)
    for suffix in ("_optim.safetensors", "_meta.json", ".safetensors"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
            break
    stem = Path(s)
    for suffix in (".safetensors", "_meta.json"):
        if not Path(f"{stem}{suffix}").exists():
            raise CheckpointError(f"{stem}{suffix}: missing (incomplete or wrong checkpoint path)")
    return stem


def load_checkpoint(model: torch.nn.Module, path: str | Path, which: str = "latest", *,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = False,
                    strict: bool = True) -> dict:
    """Load weights (and optionally optimizer state and RNG) into place; return the metadata."""
    stem = resolve_checkpoint(path, which)
    try:
        meta = json.loads(Path(f"{stem}_meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{stem}_meta.json: unreadable or corrupt ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{stem}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        weights = load_file(f"{stem}.safetensors")
    except Exception as exc:  # safetensors raises its own error types for truncation/corruption
        raise CheckpointError(f"{stem}.safetensors: corrupt or truncated ({exc})") from exc
    for alias, source in meta.get("aliases", {}).items():
        weights[alias] = weights[source]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{n}: checkpoint {tuple(weights[n].shape)} vs model {tuple(t.shape)}"
             for n, t in expected.items() if n in weights and weights[n].shape != t.shape]
    if strict and (missing or unexpected or wrong):
        raise CheckpointError(f"{stem}: does not match the model; missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatches {wrong[:5]}")
    _shard_like_model(weights, expected)
    model.load_state_dict(weights, strict=strict)
    meta["path"] = str(stem)
    if optimizer is not None or restore_rng:
        extra = _load_extra(stem)
        if optimizer is not None:
            load_optimizer_state(optimizer, meta, extra)
        if restore_rng:
            set_rng_state(extra, meta["rng"])
    return meta


def _shard_like_model(weights: dict[str, torch.Tensor], expected: dict) -> None:
    """FSDP2 holds DTensor shards: cut each full tensor (every rank read the file) into this rank's
    shard, without communication, so load_state_dict copies shard into shard."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, target in expected.items():
        if isinstance(target, DTensor) and name in weights:
            full = weights[name].to(device=target.device_mesh.device_type, dtype=target.dtype)
            weights[name] = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)


def _load_extra(stem) -> dict[str, torch.Tensor]:
    try:
        return load_file(f"{stem}_optim.safetensors")
    except Exception as exc:
        raise CheckpointError(f"{stem}_optim.safetensors: missing or corrupt ({exc})") from exc


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict, extra: dict | None = None) -> None:
    """Restore the optimizer saved with the checkpoint that `meta` (from load_checkpoint) describes."""
    if "optimizer" not in meta:
        raise CheckpointError(f"{meta.get('path')}: holds no optimizer state")
    extra = extra if extra is not None else _load_extra(meta["path"])
    try:
        optimizer.load_state_dict(optimizer_state_from_flat(extra, meta["optimizer"]))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{meta.get('path')}: optimizer state does not match ({exc})") from exc
