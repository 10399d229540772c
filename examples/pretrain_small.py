"""Pretrain the ~125M Retention LLM (`small`) the documented way, from Python.

    python examples/pretrain_small.py --dataset fineweb-edu --num_tokens 10B     # one GPU
    torchrun --nproc_per_node 2 examples/pretrain_small.py --dataset fineweb-edu  # DDP
    python examples/pretrain_small.py --dataset shakespeare --max_steps 20 --seq_len 256 --batch_size 2  # smoke test on CPU

Everything not given comes from configs/small.yaml.
"""

import argparse

from llmtrain.training import pretrain

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dataset", default="fineweb-edu")
parser.add_argument("--num_tokens", default=None)
parser.add_argument("--max_steps", type=int, default=None)
parser.add_argument("--seq_len", type=int, default=None)
parser.add_argument("--batch_size", type=int, default=None)
parser.add_argument("--output_dir", default="runs/small")
parser.add_argument("--backend", default="auto", choices=["auto", "torch", "deepspeed"])
args = parser.parse_args()

overrides = {k: v for k, v in vars(args).items() if v is not None}
if args.max_steps is not None:
    overrides.setdefault("num_tokens", None)
    overrides["compile"] = False  # a smoke test is not worth a compile
summary = pretrain("small", **overrides)
print({k: summary[k] for k in ("step", "loss") if k in summary})
