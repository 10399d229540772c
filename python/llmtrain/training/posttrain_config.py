"""Post-training configurations (SFT, reward model, DPO, PPO): dataclasses, YAML presets, CLI overrides.

    llmtrain sft --model_path runs/small/hf --dataset databricks-dolly-15k --epochs 3 --batch_size 4 \
        --learning_rate 1e-5 --output_dir runs/sft

Same rules as the pretraining config (llmtrain.training.config): every key is checked, and an unknown
key or a bad value raises ConfigError naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional


from llmtrain.training.config import ConfigError, load_dataclass_config


@dataclass
class PostTrainConfig:
    """What every post-training method shares: model, data, schedule, checkpoints, systems."""

    # model
    model_path: Optional[str] = None         # an HF model dir (a pretraining run's <output_dir>/hf)
    model_size: str = "tiny"                 # without model_path: a fresh model of this preset
    model_overrides: dict = field(default_factory=dict)
    tokenizer: Optional[str] = None          # None: model_path's tokenizer, else the bundled BPE
    # data
    dataset: str = "dolly-sample"            # bundled, catalog (databricks-dolly-15k, Anthropic/hh-rlhf) or files
    dataset_format: str = "auto"             # auto | alpaca | dolly | flan | messages | oasst | hh-rlhf | ...
    num_samples: Optional[int] = None        # cap on the rows read
    eval_fraction: float = 0.05              # held out for evaluation
    max_eval_examples: int = 500
    max_length: int = 512                    # tokens per example (prompt + response)
    skip_invalid: bool = False               # drop bad rows (missing fields, empty or unfittable) instead of failing
    # schedule
    epochs: int = 1
    max_steps: Optional[int] = None          # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    log_interval: int = 10
    save_interval: int = 500
    keep_last: int = 2
    output_dir: str = "runs/posttrain"
    resume: Optional[str] = None             # "latest" or a checkpoint path
    # systems
    backend: str = "auto"                    # auto | torch | deepspeed | mlx (sft only; auto picks it on macOS)
    ds_config: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1337
    max_bad_steps: int = 10
    progress: bool = True

    def validate(self) -> "PostTrainConfig":
        for key in ("max_length", "batch_size", "grad_accum", "epochs", "eval_interval", "log_interval",
                    "save_interval", "max_eval_examples", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "keep_last"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("max_steps", "num_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip/weight_decay: must be >= 0")
        if self.backend not in ("auto", "torch", "deepspeed") + (("mlx",) if isinstance(self, SFTConfig) else ()):
            raise ConfigError(f"backend: post-training runs on torch or deepspeed (sft also mlx), got {self.backend!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype: must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"device: must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        known = {"auto", "alpaca", "dolly", "flan", "messages", "chat", "oasst", "hh-rlhf", "ultrafeedback",
                 "rewardbench"}
        if self.dataset_format not in known:
            raise ConfigError(f"dataset_format: must be one of {sorted(known)}, got {self.dataset_format!r}")
        return self


@dataclass
class SFTConfig(PostTrainConfig):
    output_dir: str = "runs/sft"
    packing: bool = False                    # pack examples into rows of max_length instead of padding


@dataclass
class RewardConfig(PostTrainConfig):
    dataset: str = "hh-rlhf-sample"
    output_dir: str = "runs/reward"
    eval_fraction: float = 0.1


@dataclass
class DPOConfig(PostTrainConfig):
    dataset: str = "hh-rlhf-sample"
    output_dir: str = "runs/dpo"
    reference_model: Optional[str] = None    # None: the starting policy (model_path)
    beta: float = 0.1                        # strength of the implicit KL constraint
    label_smoothing: float = 0.0             # conservative DPO: assumed rate of flipped labels

    def validate(self) -> "DPOConfig":
        super().validate()
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        return self


@dataclass
class PPOConfig(PostTrainConfig):
    dataset: str = "hh-rlhf-sample"          # prompts: the conversation up to the last assistant turn
    output_dir: str = "runs/ppo"
    reward_model: Optional[str] = None       # required: a dir written by `llmtrain rlhf train-reward`
    value_model: Optional[str] = None        # None: start the value model from the reward model
    max_steps: Optional[int] = None          # rollout batches (PPO iterations); or epochs over the prompts
    rollout_batch_size: int = 16             # prompts per rollout
    batch_size: int = 4                      # rollouts per minibatch of the PPO update
    ppo_epochs: int = 4                      # passes over each rollout batch
    max_prompt_length: int = 256
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0                           # 0: sample from the full distribution
    kl_coef: float = 0.05                    # per-token penalty on log pi - log pi_ref
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    missing_eos_penalty: float = 0.0         # subtracted from the score of responses cut at max_new_tokens
    log_interval: int = 1
    eval_interval: int = 10**9               # PPO logs rollout statistics instead of an eval loss

    def validate(self) -> "PPOConfig":
        super().validate()
        if not self.reward_model:
            raise ConfigError("reward_model: required (a directory written by `llmtrain rlhf train-reward`)")
        for key in ("rollout_batch_size", "ppo_epochs", "max_prompt_length", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.rollout_batch_size % self.batch_size:
            raise ConfigError(f"rollout_batch_size: must be a multiple of batch_size ({self.batch_size}), "
                              f"got {self.rollout_batch_size}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        for key in ("kl_coef", "vf_coef", "clip_range", "clip_range_value", "missing_eos_penalty", "top_k"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.max_prompt_length + self.max_new_tokens > self.max_length:
            raise ConfigError(f"max_length: must hold max_prompt_length + max_new_tokens "
                              f"({self.max_prompt_length} + {self.max_new_tokens}), got {self.max_length}")
        return self


def load_posttrain_config(config_class, config: Optional[str] = None, overrides: Optional[dict] = None):
    """Defaults <- YAML file or preset (configs/sft_*.yaml, configs/rlhf_*.yaml) <- overrides; validated."""
    return load_dataclass_config(config_class, config, overrides)
