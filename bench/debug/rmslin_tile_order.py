"""A/B of the persistent GEMM's tile order (LLMTRAIN_RMSLIN_SWIZZLE / _RASTER) and of the forward kernels,
one process, one GPU: forward ms (do_bench medians, interleaved rounds) at 16384 x 2048 -> m, against the
bare cuBLAS GEMM, plus a profiler breakdown of each forward's kernels.

Usage: python3 bench/debug/rmslin_tile_order.py [--out 2048,5632,8192] [--cfgs v2,v2:s2,v2:s4:n,v7]
A config is FWD[:sN][:m|n]: LLMTRAIN_RMSLIN_FWD=FWD (default: the op's default), swizzle N, raster m or n.
"""
import argparse
import os
import statistics

import torch
import torch.nn.functional as F
import triton.testing

from llmtrain.ops.rmsnorm_linear.op import rmsnorm_linear


def apply(cfg):
    parts = cfg.split(":")
    for k in ("LLMTRAIN_RMSLIN_FWD", "LLMTRAIN_RMSLIN_SWIZZLE", "LLMTRAIN_RMSLIN_RASTER"):
        os.environ.pop(k, None)
    if parts[0] != "default":
        os.environ["LLMTRAIN_RMSLIN_FWD"] = parts[0]
    for p in parts[1:]:
        if p.startswith("s"):
            os.environ["LLMTRAIN_RMSLIN_SWIZZLE"] = p[1:]
        else:
            os.environ["LLMTRAIN_RMSLIN_RASTER"] = p


def kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.count:
            rows.append((e.self_device_time_total / 5, e.key[:90]))
    return sorted(rows, reverse=True)[:4]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="2048,5632,8192")
    ap.add_argument("--cfgs", default="default,v2,v2:s2,v2:s4,v2:s8,v2:m,v2:n")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    n, k = 16384, 2048
    cfgs = a.cfgs.split(",")
    for m in [int(v) for v in a.out.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        g = 1 + 0.1 * torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
        ref = F.linear(F.rms_norm(x.float(), (k,), g.float(), 1e-6), w.float())
        times = {c: [] for c in cfgs + ["gemm"]}
        for r in range(a.rounds):
            times["gemm"].append(triton.testing.do_bench(lambda: F.linear(x, w)))
            for c in cfgs:
                apply(c)
                y = rmsnorm_linear(x, g, w, None, 1e-6)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (c, m, err)
                times[c].append(triton.testing.do_bench(lambda: rmsnorm_linear(x, g, w, None, 1e-6)))
        base = statistics.median(times["gemm"])
        print(f"## m = {m}: bare cuBLAS GEMM {base:.4f} ms")
        for c in cfgs:
            t = statistics.median(times[c])
            apply(c)
            ks = kernels(lambda: rmsnorm_linear(x, g, w, None, 1e-6))
            print(f"{c:12s} fwd {t:.4f} ms ({t / base:.3f}x)  " + "; ".join(f"{us:.1f} us {name[:40]}" for us, name in ks))
        apply("default")


if __name__ == "__main__":
    main()
