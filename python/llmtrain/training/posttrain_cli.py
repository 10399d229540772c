"""`llmtrain sft` and `llmtrain rlhf {train-reward,ppo,dpo}`: a YAML preset plus --key value overrides.

    llmtrain sft --model_path runs/small/hf --dataset databricks-dolly-15k --epochs 3 --batch_size 4 \
        --learning_rate 1e-5 --output_dir runs/sft
    llmtrain rlhf train-reward --dataset Anthropic/hh-rlhf --output_dir runs/reward
    llmtrain rlhf ppo --model_path runs/sft/hf --reward_model runs/reward/hf --dataset Anthropic/hh-rlhf \
        --output_dir runs/ppo
    llmtrain rlhf dpo --model_path runs/sft/hf --dataset Anthropic/hh-rlhf --output_dir runs/dpo

Every key of the method's config (llmtrain.training.posttrain_config) can be given as --key value.
"""

from __future__ import annotations

import sys

from llmtrain.training.config import ConfigError, parse_overrides

# command -> (config class, runner), imported lazily so `llmtrain --help` stays fast
_METHODS = {
    "sft": ("SFTConfig", "llmtrain.training.sft", "run_sft"),
    "train-reward": ("RewardConfig", "llmtrain.training.reward", "run_reward_training"),
    "dpo": ("DPOConfig", "llmtrain.training.dpo", "run_dpo"),
    "ppo": ("PPOConfig", "llmtrain.training.ppo", "run_ppo"),
}


def _run(command: str, args) -> int:
    import importlib

    from llmtrain.training import posttrain_config
    from llmtrain.training.posttrain_data import DatasetFormatError

    config_name, module, runner = _METHODS[command]
    label = "sft" if command == "sft" else f"rlhf {command}"
    try:
        cfg = posttrain_config.load_posttrain_config(getattr(posttrain_config, config_name), args.config,
                                                     parse_overrides(args.overrides))
        summary = getattr(importlib.import_module(module), runner)(cfg)
    except (ConfigError, DatasetFormatError, FileNotFoundError) as exc:
        print(f"llmtrain {label}: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


def _add(subparsers, command: str, help: str, description: str) -> None:
    p = subparsers.add_parser(command, help=help, description=description)
    p.add_argument("--config", default=None, help="YAML file or preset name in configs/ (e.g. sft_dolly)")
    # every other --key value pair overrides the config (collected by llmtrain.cli.main)
    p.set_defaults(func=lambda args: _run(command, args), overrides=[], accepts_overrides=True)


def register(subparsers) -> None:
    _add(subparsers, "sft", "supervised fine-tuning on instruction/chat data (loss on responses only)",
         "Fine-tune a model (--model_path, an HF dir such as a pretraining run's <output_dir>/hf) on an "
         "instruction or chat dataset with the chat template; e.g. --dataset databricks-dolly-15k --epochs 3 "
         "--batch_size 4 --learning_rate 1e-5 --output_dir runs/sft. Any config key as --key value.")
    rlhf = subparsers.add_parser("rlhf", help="alignment: reward model, PPO, DPO",
                                 description="Alignment from preference data: train-reward, ppo, dpo.")
    methods = rlhf.add_subparsers(dest="rlhf_command", metavar="METHOD")
    _add(methods, "train-reward", "train a reward model (Bradley-Terry loss on preference pairs)",
         "Train a sequence-classification reward model on chosen/rejected pairs; reports held-out pairwise "
         "accuracy. e.g. --dataset Anthropic/hh-rlhf --model_path runs/sft/hf --output_dir runs/reward.")
    _add(methods, "ppo", "PPO against a reward model, with a KL penalty to the reference policy",
         "PPO: --model_path (policy, also the frozen reference) --reward_model (a train-reward output) "
         "--dataset (prompts) --output_dir. Logs reward, KL, entropy and clip fraction.")
    _add(methods, "dpo", "Direct Preference Optimization on preference pairs",
         "DPO from --model_path (also the reference unless --reference_model) on --dataset pairs; logs "
         "reward margins and accuracies.")
    rlhf.set_defaults(func=lambda args: rlhf.print_help() or 2)
