"""How many operators one training step dispatches: the host's share of a step.

    python bench/host_ops.py --model small [--baseline gpt2] [--top 15] [--device cuda]

At a small batch a GPU finishes each kernel before the host has launched the next, and the step
time is (operators per step) x (host cost per operator) whatever the batch (the 124M model's
8 x 1024 step on an H200 takes about 47 ms for 1 x 8 and 2 x 4 sequences alike; docs/perf.md,
"Distributed"). This counts the ATen and llmtrain operators of one forward + backward under bf16
autocast with a short sequence (the count does not depend on the sequence length), beside the dense
SDPA baseline of the same shape. On a GPU (`--device cuda`) the count is the GPU path's. On the CPU
it is an upper bound of it: there some composite operators decompose (RMSNorm into pow, mean, rsqrt
and mul, where CUDA runs one fused kernel each way).
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


# Operators that only make a new view or read metadata: no kernel runs on the GPU for them.
NO_KERNEL = {"aten.view", "aten._unsafe_view", "aten.t", "aten.detach", "aten.expand", "aten.permute",
             "aten.transpose", "aten.split", "aten.split_with_sizes", "aten.slice", "aten.select",
             "aten.unsqueeze", "aten.squeeze", "aten.reshape", "aten.as_strided", "aten.alias",
             "aten.promote_types", "aten.unbind", "aten.chunk", "aten.narrow", "aten.empty", "aten.empty_like"}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(loss_fn, device: torch.device) -> collections.Counter:
    """Operators of one forward + backward (after one uncounted step, so lazy initialisation is not counted)."""
    for counting in (False, True):
        counter = _OpCounter()
        with counter if counting else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
    return counter.counts


def main(argv=None) -> int:
    from llmtrain.bench.baselines import baseline_for
    from llmtrain.models import build_model, create_model_config
    from llmtrain.training.trainer import lm_loss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="model preset (default: small)")
    p.add_argument("--baseline", choices=["none", "gpt2", "llama"], default="gpt2")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--top", type=int, default=12, help="most frequent operators to list")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    if args.seq_len < 2:
        p.error("--seq_len must be at least 2")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")

    torch.manual_seed(0)
    try:
        config = create_model_config(args.model)
    except ValueError as exc:
        p.error(str(exc))
    x = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
    model = build_model(config).to(device)
    rows = [(f"{args.model} ({config.model_type})", count_step(lambda: lm_loss(model, x, y), device))]
    if args.baseline != "none":
        del model
        dense = baseline_for(args.baseline, config, args.seq_len).to(device)
        rows.append((f"{args.baseline} baseline (eager)", count_step(lambda: dense(x, y), device)))
    layers = config.num_hidden_layers
    print(f"operators per training step (forward + backward) on {device.type}, {layers} layers:")
    for label, counts in rows:
        total = sum(counts.values())
        kernels = sum(n for name, n in counts.items() if name not in NO_KERNEL)
        print(f"\n{label}: {total:,} operators ({total / layers:.0f} per layer), {kernels:,} of them run "
              f"kernels ({kernels / layers:.0f} per layer)")
        for name, n in counts.most_common(args.top):
            print(f"  {n:6,d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
