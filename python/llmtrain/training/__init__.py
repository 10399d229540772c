"""Trainers (pretraining; post-training in later modules) and their building blocks."""

from llmtrain.training.config import ConfigError, TrainConfig, load_config
from llmtrain.training.logger import TrainingLogger, compute_perplexity
from llmtrain.training.trainer import Trainer, train_step


def pretrain(config: str | None = None, **overrides):
    """Run pretraining from a preset/YAML plus keyword overrides; returns the run summary."""
    from llmtrain.training.cli import run_pretraining

    return run_pretraining(load_config(config, overrides))


def finetune(model_path=None, dataset_name="dolly-sample", output_dir="runs/sft", **kwargs):
    """Supervised fine-tuning (see llmtrain.training.sft.finetune); returns the run summary."""
    from llmtrain.training.sft import finetune as _finetune

    return _finetune(model_path=model_path, dataset_name=dataset_name, output_dir=output_dir, **kwargs)


def train_reward_model(model_path=None, dataset_name="hh-rlhf-sample", output_dir="runs/reward", **kwargs):
    """Reward-model training (see llmtrain.training.reward); returns the run summary."""
    from llmtrain.training.reward import train_reward_model as _train

    return _train(model_path=model_path, dataset_name=dataset_name, output_dir=output_dir, **kwargs)


def train_dpo(model_path, dataset_name="hh-rlhf-sample", output_dir="runs/dpo", **kwargs):
    """DPO (see llmtrain.training.dpo); returns the run summary."""
    from llmtrain.training.dpo import train_dpo as _train

    return _train(model_path=model_path, dataset_name=dataset_name, output_dir=output_dir, **kwargs)


def train_ppo(model_path, reward_model, dataset_name="hh-rlhf-sample", output_dir="runs/ppo", **kwargs):
    """PPO (see llmtrain.training.ppo); returns the run summary."""
    from llmtrain.training.ppo import train_ppo as _train

    return _train(model_path=model_path, reward_model=reward_model, dataset_name=dataset_name,
                  output_dir=output_dir, **kwargs)


__all__ = ["ConfigError", "TrainConfig", "Trainer", "TrainingLogger", "compute_perplexity", "finetune",
           "load_config", "pretrain", "train_dpo", "train_ppo", "train_reward_model", "train_step"]
