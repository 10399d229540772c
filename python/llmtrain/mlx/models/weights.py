"""Weights in the torch models' safetensors layout, so checkpoints move between torch and MLX.

Sources ``load_pretrained`` accepts:
- a Hugging Face directory (``save_pretrained`` of the torch or the MLX model): config.json and
  model.safetensors, or shards listed in model.safetensors.index.json;
- a trainer checkpoint (``checkpoint_epoch{e}_step{s}``: its .safetensors, _meta.json or the stem;
  or a run directory, meaning its latest checkpoint), from either trainer: the model config is in
  the _meta.json and tied weights are stored once, with ``aliases`` naming the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from transformers import PretrainedConfig

from llmtrain.mlx.models.lm import CausalLM, build_model
from llmtrain.models.config import MLAConfig, RetentionConfig

TIED_HEAD = "lm_head.weight"
TIED_SOURCE = "model.embed_tokens.weight"
_CONFIG_CLASSES = {cls.model_type: cls for cls in (RetentionConfig, MLAConfig)}


def config_from_dict(values: dict) -> PretrainedConfig:
    """A RetentionConfig or MLAConfig from its to_dict() / config.json content."""
    model_type = values.get("model_type")
    if model_type not in _CONFIG_CLASSES:
        raise ValueError(f"not an llmtrain model config: model_type {model_type!r} (known: {sorted(_CONFIG_CLASSES)})")
    return _CONFIG_CLASSES[model_type].from_dict(values)


def model_weights(model: CausalLM) -> dict[str, mx.array]:
    """Parameters by their torch names; a tied lm_head is left out (it is the embedding)."""
    return dict(tree_flatten(model.parameters()))


def weight_aliases(model: CausalLM) -> dict[str, str]:
    """Names stored under another name (the trainer checkpoints' ``aliases``)."""
    return {TIED_HEAD: TIED_SOURCE} if model.tied else {}


def load_weights(model: CausalLM, weights: dict[str, mx.array], dtype=None) -> CausalLM:
    """Load torch-named weights into the model (strict: every parameter, matching shapes).

    A tied model accepts and ignores ``lm_head.weight`` (torch state dicts hold it as a second name);
    ``dtype`` casts floating weights (default: as stored).
    """
    weights = dict(weights)
    if model.tied:
        weights.pop(TIED_HEAD, None)
    expected = model_weights(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{n}: {tuple(weights[n].shape)} vs model {tuple(a.shape)}"
             for n, a in expected.items() if n in weights and tuple(weights[n].shape) != tuple(a.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"weights do not match the {type(model).__name__}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {wrong[:5]}")
    if dtype is not None:
        weights = {n: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a for n, a in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model


def save_weights(model: CausalLM, path: str | Path, metadata: Optional[dict[str, str]] = None) -> Path:
    """One safetensors file of the model's weights (tied head once), readable by torch's loaders."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the file name must end in .safetensors (mx.save_safetensors adds it otherwise)")
    mx.save_safetensors(str(path), model_weights(model), metadata={"format": "pt", **(metadata or {})})
    return path


def save_pretrained(model: CausalLM, directory: str | Path) -> Path:
    """config.json + model.safetensors: ``AutoModelForCausalLM.from_pretrained`` loads it in torch."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_weights(model, directory / "model.safetensors")
    return directory


def _read_pretrained_dir(directory: Path) -> tuple[PretrainedConfig, dict[str, mx.array]]:
    config = config_from_dict(json.loads((directory / "config.json").read_text()))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors (or index); only safetensors weights are read")
    weights: dict[str, mx.array] = {}
    for name in files:
        weights.update(mx.load(str(directory / name)))
    return config, weights


def _read_trainer_checkpoint(path: Path) -> tuple[PretrainedConfig, dict[str, mx.array]]:
    from llmtrain.training.checkpoint import resolve_checkpoint

    stem = resolve_checkpoint(path)
    meta = json.loads(Path(f"{stem}_meta.json").read_text())
    if not meta.get("model_config"):
        raise ValueError(f"{stem}_meta.json: holds no model_config")
    weights = mx.load(f"{stem}.safetensors")
    for alias, source in meta.get("aliases", {}).items():
        weights[alias] = weights[source]
    return config_from_dict(meta["model_config"]), weights


def read_pretrained(path: str | Path) -> tuple[PretrainedConfig, dict[str, mx.array]]:
    """(config, torch-named weights) from a Hugging Face directory or a trainer checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return _read_pretrained_dir(path)
    return _read_trainer_checkpoint(path)


def load_pretrained(path: str | Path, dtype=None) -> CausalLM:
    """The MLX model of a torch or MLX checkpoint (see the module docstring for accepted paths)."""
    config, weights = read_pretrained(path)
    return load_weights(build_model(config, seed=None), weights, dtype=dtype)
