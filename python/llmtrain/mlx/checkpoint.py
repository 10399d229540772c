"""Checkpoints of the MLX trainer in the torch trainer's layout (llmtrain.training.checkpoint):

    checkpoint_epoch{e}_step{s}.safetensors        model weights, torch names (tied head once + aliases)
    checkpoint_epoch{e}_step{s}_optim.safetensors  optimizer arrays (+ torch/numpy RNG states)
    checkpoint_epoch{e}_step{s}_meta.json          step, epoch, config, data position, optimizer scalars
    latest.txt                                     name of the newest complete checkpoint

Files are written to temporary names and renamed into place, latest.txt last; only the last
``keep_last`` checkpoints are kept. The weights load into the torch models
(``llmtrain.training.utils.load_checkpoint``) and torch checkpoints' weights into MLX
(``llmtrain.mlx.models.load_pretrained``). The optimizer state is MLX's own tree (AdamW moments
under their parameter paths): arrays in safetensors, 0-d values (step, learning rate) as JSON
scalars. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from llmtrain.mlx.models import CausalLM, load_weights, model_weights, weight_aliases
from llmtrain.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    _atomic_write_bytes,
    _json_default,
    checkpoint_name,
    list_checkpoints,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)

OPTIMIZER_PREFIX = "optimizer."
FRAMEWORK = "mlx"


def _atomic_save_arrays(arrays: dict[str, mx.array], path: Path, metadata: dict[str, str] | None = None) -> None:
    # mx.save_safetensors appends ".safetensors" to names without it, so the temporary name keeps it
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_state_to_flat(optimizer: optim.Optimizer) -> tuple[dict[str, mx.array], dict]:
    """Arrays by their path in optimizer.state, and the 0-d ones as JSON scalars with their dtype."""
    arrays, scalars = {}, {}
    for path, value in tree_flatten(optimizer.state):
        if value.ndim == 0:
            scalars[path] = {"value": value.item(), "dtype": str(value.dtype).split(".")[-1]}
        else:
            arrays[OPTIMIZER_PREFIX + path] = value
    return arrays, {"framework": FRAMEWORK, "scalars": scalars}


def optimizer_state_from_flat(arrays: dict[str, mx.array], meta: dict) -> dict:
    items = [(k[len(OPTIMIZER_PREFIX):], v) for k, v in arrays.items() if k.startswith(OPTIMIZER_PREFIX)]
    items += [(k, mx.array(s["value"], dtype=getattr(mx, s["dtype"]))) for k, s in meta["scalars"].items()]
    return tree_unflatten(sorted(items, key=lambda kv: kv[0]))


def save_checkpoint(run_dir: str | Path, *, model: CausalLM, optimizer: optim.Optimizer | None, step: int,
                    epoch: int, meta: dict, keep_last: int = 3) -> Path:
    """Write one checkpoint atomically, point latest.txt at it, and keep only the last ``keep_last``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stem = run_dir / checkpoint_name(epoch, step)
    _atomic_save_arrays(model_weights(model), Path(f"{stem}.safetensors"), metadata={"format": "pt"})
    full_meta = dict(meta, step=step, epoch=epoch, format_version=FORMAT_VERSION, aliases=weight_aliases(model),
                     framework=FRAMEWORK)
    extra: dict[str, mx.array] = {}
    if optimizer is not None:
        extra, full_meta["optimizer"] = optimizer_state_to_flat(optimizer)
    rng_tensors, full_meta["rng"] = rng_state()
    extra.update({name: mx.array(t.numpy()) for name, t in rng_tensors.items()})
    _atomic_save_arrays(extra, Path(f"{stem}_optim.safetensors"))
    _atomic_write_bytes(Path(f"{stem}_meta.json"), json.dumps(full_meta, indent=1, default=_json_default).encode())
    _atomic_write_bytes(run_dir / "latest.txt", (stem.name + "\n").encode())
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        for suffix in (".safetensors", "_optim.safetensors", "_meta.json"):
            Path(f"{old}{suffix}").unlink(missing_ok=True)
    return stem


def load_checkpoint(model: CausalLM, path: str | Path, which: str = "latest", *,
                    optimizer: optim.Optimizer | None = None, restore_rng: bool = False) -> dict:
    """Load weights (any trainer's checkpoint) and optionally the MLX optimizer state and the RNG
    states into place; return the metadata (with ``path``)."""
    import torch

    stem = resolve_checkpoint(path, which)
    try:
        meta = json.loads(Path(f"{stem}_meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{stem}_meta.json: unreadable or corrupt ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{stem}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    try:
        weights = mx.load(f"{stem}.safetensors")
    except Exception as exc:
        raise CheckpointError(f"{stem}.safetensors: corrupt or truncated ({exc})") from exc
    for alias, source in meta.get("aliases", {}).items():
        weights[alias] = weights[source]
    try:
        load_weights(model, weights)
    except ValueError as exc:
        raise CheckpointError(f"{stem}: {exc}") from exc
    if optimizer is not None or restore_rng:
        try:
            extra = mx.load(f"{stem}_optim.safetensors")
        except Exception as exc:
            raise CheckpointError(f"{stem}_optim.safetensors: missing or corrupt ({exc})") from exc
        if optimizer is not None:
            if meta.get("optimizer", {}).get("framework") != FRAMEWORK:
                raise CheckpointError(f"{stem}: its optimizer state is not MLX's (a torch trainer checkpoint?); "
                                      "start a new run from its weights with llmtrain.mlx.models.load_pretrained")
            optimizer.state = optimizer_state_from_flat(extra, meta["optimizer"])
            mx.eval(optimizer.state)
        if restore_rng:
            set_rng_state({k: torch.from_numpy(np.array(v)) for k, v in extra.items() if k.startswith("rng.")},
                          meta["rng"])
    meta["path"] = str(stem)
    return meta
