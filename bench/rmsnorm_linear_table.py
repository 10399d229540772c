"""One table, one run, one GPU: fused RMSNorm + Linear vs eager, torch.compile, Liger, bare GEMM.

Rows 16384 x hidden 2048 -> out 2048, 5632, 8192 (bf16). Forward and forward+backward medians from
triton.testing.do_bench. Prints a markdown table; `--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [(16384, 2048, 2048), (16384, 2048, 5632), (16384, 2048, 8192)]
EPS = 1e-6


def eager(x, g, w):
    return F.linear(F.rms_norm(x, (x.shape[-1],), g, EPS), w)


def make_impls():
    from llmtrain.ops.rmsnorm_linear.op import rmsnorm_linear

    impls = {
        "ours": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "eager": eager,
        "compiled": torch.compile(eager),
    }
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def liger(x, g, w):
            return F.linear(LigerRMSNormFunction.apply(x, g, EPS), w)

        impls["liger"] = liger
    except Exception as exc:  # not installed or API moved
        print(f"# liger unavailable: {exc}", file=sys.stderr)
    return impls


def inputs(n, k, m, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    g = 1 + 0.1 * torch.randn(k, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen) / k**0.5
    dy = torch.randn(n, m, device="cuda", dtype=dtype, generator=gen)
    return x, g, w, dy


def fwd_fn(f, x, g, w):
    def run():
        with torch.no_grad():
            return f(x, g, w)
    return run


def fwd_bwd_fn(f, x, g, w, dy):
    xs, gs, ws = (t.detach().requires_grad_(True) for t in (x, g, w))

    def run():
        y = f(xs, gs, ws)
        return torch.autograd.grad(y, (xs, gs, ws), dy)
    return run


def gemm_fn(x, w):
    wt = w.t()

    def run():
        return torch.matmul(x, wt)
    return run


def measure(fn, warmup=50, rep=300):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def run_all(shapes=SHAPES):
    impls = make_impls()
    rows = []
    for n, k, m in shapes:
        x, g, w, dy = inputs(n, k, m)
        r = {"shape": f"{n}x{k}->{m}", "gemm": measure(gemm_fn(x, w)), "fwd": {}, "fwd_bwd": {}}
        for name, f in impls.items():
            r["fwd"][name] = measure(fwd_fn(f, x, g, w))
            r["fwd_bwd"][name] = measure(fwd_bwd_fn(f, x, g, w, dy))
        rows.append(r)
        del x, g, w, dy
        torch.cuda.empty_cache()
    return rows


def table(rows):
    names = list(rows[0]["fwd"].keys())
    out = []
    hdr = "| shape | bare GEMM | " + " | ".join(f"fwd {n}" for n in names) + " | ours/GEMM | " + \
        " | ".join(f"fwd+bwd {n}" for n in names) + " | eager/ours fwd+bwd |"
    out.append(hdr)
    out.append("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        f, fb = r["fwd"], r["fwd_bwd"]
        cells = [r["shape"], f"{r['gemm']:.3f}"] + [f"{f[n]:.3f}" for n in names] + \
            [f"{f['ours'] / r['gemm']:.3f}x"] + [f"{fb[n]:.3f}" for n in names] + \
            [f"{fb['eager'] / fb['ours']:.3f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = run_all()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; times in ms (do_bench median)")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
