"""`llmtrain pretrain`: YAML preset + documented CLI overrides -> Trainer."""

from __future__ import annotations

import sys

from llmtrain.training.config import ConfigError, load_config, parse_overrides


def run_pretraining(cfg) -> dict:
    from llmtrain.training.backends import select_backend
    from llmtrain.training.report import report_pretraining
    from llmtrain.training.trainer import Trainer

    if select_backend(cfg.backend) == "mlx":  # Apple silicon: the MLX model and loop
        from llmtrain.mlx.trainer import run_pretraining as run_mlx

        return run_mlx(cfg)

    trainer = Trainer(cfg)
    if trainer.is_main:
        n = sum(p.numel() for p in trainer.module.parameters())
        print(f"model {cfg.model_size} ({trainer.model_config.model_type}): {n / 1e6:.1f}M parameters on "
              f"{trainer.device}; backend {trainer.backend.name}; {trainer.total_steps} steps of "
              f"{trainer.tokens_per_step} tokens")
    return report_pretraining(cfg, trainer, trainer.train())


def run(args) -> int:
    try:
        overrides = parse_overrides(args.overrides)
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"llmtrain pretrain: config error: {exc}", file=sys.stderr)
        return 2
    summary = run_pretraining(cfg)
    return 130 if summary.get("interrupted") else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a model (default: the quick start, tiny model on the bundled corpus)",
        description="Pretrain from a YAML config (a file or a preset name in configs/) plus overrides in the "
                    "form --key value, e.g. --model_size small --dataset fineweb-edu --num_tokens 10B "
                    "--batch_size 8 --seq_len 2048 --learning_rate 3e-4 --output_dir runs/small.")
    p.add_argument("--config", default="quick_start", help="YAML file or preset name (default: quick_start)")
    # every other --key value pair overrides the config (collected by llmtrain.cli.main)
    p.set_defaults(func=run, overrides=[], accepts_overrides=True)
