"""One power retention forward+backward under Nsight Compute (ncu): hardware counters per kernel.

Warm-up steps run outside the capture; the step in between cudaProfilerStart/Stop is the one ncu
profiles (run ncu with --profile-from-start off). bf16, 8 heads, gated, b = 65536 / t.

Usage: ncu --profile-from-start off --clock-control none ... python bench/ncu_retention.py [--t 65536] [--d 64]
"""

from __future__ import annotations

import argparse

import torch

from power_retention_profile import step_fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    a = ap.parse_args()
    step = step_fn(max(1, 65536 // a.t), a.t, a.d)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
