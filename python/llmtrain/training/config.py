"""The pretraining configuration: one dataclass, YAML presets in configs/, CLI overrides.

    llmtrain pretrain --config configs/small.yaml --batch_size 8 --num_tokens 10B

Every key is checked: an unknown key, a value of the wrong type or out of range raises
ConfigError naming the key (and, for unknown keys, the closest known one).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, or invalid; the message names the key."""


@dataclass
class TrainConfig:
    # model
    model_size: str = "tiny"                 # a preset of llmtrain.models.create_model_config
    model_overrides: dict = field(default_factory=dict)
    # data
    dataset: str = "shakespeare"             # bundled name, catalog name, or path to files/shards
    data_dir: Optional[str] = None           # where shards are prepared (default: <output_dir>/data)
    tokenizer: Optional[str] = None          # None: the bundled offline BPE
    seq_len: int = 256
    num_workers: int = 0
    # schedule
    batch_size: int = 8                      # sequences per micro-batch (per process)
    grad_accum: int = 1
    num_tokens: Optional[str] = None         # total training tokens ("10B", "50M", "2e6"); or max_steps
    max_steps: Optional[int] = None
    stop_at_step: Optional[int] = None       # save and exit at this step (schedule still spans max_steps)
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_batches: int = 10
    log_interval: int = 10
    save_interval: int = 500
    keep_last: int = 3
    output_dir: str = "runs/pretrain"
    resume: Optional[str] = None             # "latest" or a checkpoint path
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 60
    # systems
    backend: str = "auto"                    # auto | torch | deepspeed | mlx
    fsdp: bool = False                       # torch backend: shard with FSDP2 (fully_shard) instead of DDP
    ds_config: Optional[str] = None          # DeepSpeed JSON (default: configs/ds_config.json)
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                      # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 1337
    max_bad_steps: int = 10                  # consecutive non-finite losses before stopping
    progress: bool = True

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_steps is not None:
            return self.max_steps
        tokens_per_step = self.batch_size * self.seq_len * self.grad_accum * world_size
        return max(1, parse_count(self.num_tokens, "num_tokens") // tokens_per_step)

    def validate(self) -> "TrainConfig":
        pos = ("seq_len", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval",
               "save_interval", "sample_tokens", "max_bad_steps")
        for key in pos:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "keep_last", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip/weight_decay: must be >= 0")
        if self.backend not in ("auto", "torch", "deepspeed", "mlx"):
            raise ConfigError(f"backend: must be auto, torch, deepspeed or mlx, got {self.backend!r}")
        if self.fsdp and self.backend not in ("auto", "torch"):
            raise ConfigError(f"fsdp: FSDP2 is an option of the torch backend, not backend={self.backend} "
                              "(DeepSpeed shards through ZeRO in ds_config)")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype: must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device: must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.max_steps is None and self.num_tokens is None:
            raise ConfigError("num_tokens: set num_tokens (e.g. 10B) or max_steps")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"stop_at_step: must be >= 1, got {self.stop_at_step}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.num_tokens is not None:
            parse_count(self.num_tokens, "num_tokens")
        from llmtrain.models import create_model_config

        try:
            create_model_config(self.model_size, **self.model_overrides)
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"model_size: {exc}") from exc
        return self


_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_count(value: Any, key: str) -> int:
    """'10B' -> 10_000_000_000; '2.5M', '1e6', 1000 also accepted."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a count like 10B, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMBTkmbt]?)\s*", str(value))
        if not m:
            raise ConfigError(f"{key}: expected a count like 10B, 50M or 1e6, got {value!r}")
        n = int(float(m.group(1)) * _SUFFIX.get(m.group(2).upper(), 1))
    if n < 1:
        raise ConfigError(f"{key}: must be >= 1, got {value!r}")
    return n


def _coerce(key: str, value: Any, typ) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = get_origin(typ)
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in get_args(typ) if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if typ is float:
            return float(value)
        if typ is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    return value


def apply(config, values: dict, source: str):
    """Set `values` on a copy of a config dataclass, each converted to its field's type; unknown keys
    raise ConfigError naming the closest known one."""
    hints = get_type_hints(type(config))
    known = {f.name: hints[f.name] for f in dataclasses.fields(config)}
    updates = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown key in {source}{hint}")
        updates[key] = _coerce(key, value, known[key])
    return dataclasses.replace(config, **updates)


def configs_dir() -> Path:
    """The presets: the repository's configs/ (a source checkout) or the copy inside the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "configs", here.parents[1] / "configs"):
        if candidate.is_dir():
            return candidate
    return here.parents[1] / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = configs_dir() / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    # "configs/small.yaml" when run from elsewhere
    preset = configs_dir() / path.name
    if preset.exists():
        return preset
    known = sorted(p.stem for p in configs_dir().glob("*.yaml"))
    raise ConfigError(f"config: {name_or_path!r} is neither a file nor a preset; presets: {known}")


def load_dataclass_config(config_class, config: Optional[str] = None, overrides: Optional[dict] = None):
    """Defaults of `config_class` <- YAML file or preset <- overrides; then its validate()."""
    cfg = config_class()
    if config:
        path = resolve_config_path(config)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {path} is not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping of keys to values")
        cfg = apply(cfg, data, str(path))
    if overrides:
        cfg = apply(cfg, overrides, "command-line overrides")
    return cfg.validate()


def load_config(config: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """The pretraining config: defaults <- YAML file or preset <- overrides; then validated."""
    return load_dataclass_config(TrainConfig, config, overrides)


def parse_overrides(args: list[str]) -> dict:
    """['--batch_size', '8', '--compile', '--lr=1e-3'] -> {'batch_size': '8', 'compile': 'true', ...}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"{arg}: expected --key value")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        if key == "local_rank" and "LOCAL_RANK" in os.environ:
            continue  # the deepspeed launcher's --local_rank=N: the rank is read from the environment
        out[key] = value
    return out


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
