"""Trainers (pretraining; post-training in later modules) and their building blocks."""

from llmtrain.training.config import ConfigError, TrainConfig, load_config
from llmtrain.training.logger import TrainingLogger, compute_perplexity
from llmtrain.training.trainer import Trainer, train_step


def pretrain(config: str | None = None, **overrides):
    """Run pretraining from a preset/YAML plus keyword overrides; returns the run summary."""
    from llmtrain.training.cli import run_pretraining

    return run_pretraining(load_config(config, overrides))


__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingLogger", "compute_perplexity", "load_config",
           "pretrain", "train_step"]
