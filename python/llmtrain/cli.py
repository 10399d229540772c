"""The `llmtrain` command line: one entry point, a subcommand per job.

Each subsystem contributes its subcommands through a ``register(subparsers)`` function; a
subcommand sets ``func`` (taking the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules whose register(subparsers) adds subcommands, in the order `llmtrain --help` lists them.
SUBCOMMAND_MODULES = [
    "llmtrain.training.cli",
    "llmtrain.training.posttrain_cli",
    "llmtrain.models.cli",
    "llmtrain.data.cli",
    "llmtrain.bench.train",
    "llmtrain.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmtrain",
        description="Train Power Retention and MLA language models with fused native kernels.")
    from llmtrain import __version__

    parser.add_argument("--version", action="version", version=f"llmtrain {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finish_distributed()
    return rc


def finish_distributed() -> None:
    """After a command that ran under torchrun/deepspeed: every rank waits for the others (rank 0 may
    still be sampling or exporting), then the process group is torn down — a rank that exits with a
    live gloo/NCCL group can abort at interpreter shutdown ("terminate called without an active
    exception") and take the job down with it. Only on success: after an error a barrier could hang."""
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
