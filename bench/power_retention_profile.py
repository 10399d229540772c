"""Where the time goes: per-kernel CUDA time of one power retention forward+backward (torch profiler).

bf16, deg 2, 8 heads, gated, 65,536 tokens (b = 65536 / t), the kernel generation picked by
LLMTRAIN_RETENTION_KERNEL (or --kernels v2 v3: one section each, same process). Prints, per t, the kernels sorted by total CUDA time over `--iters` steps
(after warm-up) with their share of the step, so the next optimisation targets the biggest line.

Usage: python bench/power_retention_profile.py [--d 64] [--t 2048 65536] [--iters 5] [--kernels v2 v3]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from llmtrain.ops import power_retention

TOKENS, H = 65536, 8


def step_fn(b, t, d, chunk=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    def rnd(*s):
        return torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    q, k, v = rnd(b, t, H, d), rnd(b, t, H, d), rnd(b, t, H, d)
    log_g = F.logsigmoid(torch.randn(b, t, H, device="cuda", generator=g) + 3.0).requires_grad_()
    dy = torch.randn(b, t, H, d, device="cuda", generator=g, dtype=torch.bfloat16)

    def step():
        y = power_retention(q, k, v, log_g, chunk_size=chunk)
        torch.autograd.backward(y, dy)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--t", type=int, nargs="+", default=[2048, 65536])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--chunk", type=int, nargs="+", default=[None],
                    help="chunk sizes to profile, one section each (default: default_chunk_size)")
    ap.add_argument("--kernels", nargs="*", default=None, help="LLMTRAIN_RETENTION_KERNEL values, one section each")
    a = ap.parse_args()
    for ver in a.kernels or [None]:
        if ver:
            os.environ["LLMTRAIN_RETENTION_KERNEL"] = ver
        profile_version(a)


def profile_version(a):
    print(f"\n## kernel generation: {os.environ.get('LLMTRAIN_RETENTION_KERNEL', 'default')}, d = {a.d}, "
          f"{torch.cuda.get_device_name()}")
    for t, chunk in [(t, c) for t in a.t for c in a.chunk]:
        step = step_fn(max(1, TOKENS // t), t, a.d, chunk)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.iters):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        print(f"\n### t = {t}, b = {max(1, TOKENS // t)}, chunk {chunk or 'default'}: "
              f"{total / a.iters / 1e3:.2f} ms of kernels per step")
        print("| kernel | calls/step | ms/step | share |\n|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
            print(f"| `{name}` | {e.count // a.iters} | {e.self_device_time_total / a.iters / 1e3:.3f} | "
                  f"{e.self_device_time_total / total:.0%} |")


if __name__ == "__main__":
    main()
