"""One table, one run, one GPU: fused RMSNorm + Linear vs eager, torch.compile, Liger, bare GEMM.

Rows 16384 x hidden 2048 -> out 2048, 5632, 8192 (bf16). Forward and forward+backward medians from
triton.testing.do_bench, each the median over ROUNDS interleaved rounds. "ours" is the default (v2
pre-pass + GEMM forward, v3 register-resident row pass), "ours_v2" the whole previous generation
(LLMTRAIN_RMSLIN=v2), "ours_v3" LLMTRAIN_RMSLIN=v3 (fused one-GEMM forward), "ours_ro" v3 with
LLMTRAIN_RMSLIN_FWD=ro (W diag(g) pre-pass, the fused GEMM only sums x^2), "ours_sm80" the portable
mma.sync path forced on this GPU, "ours_pdl" / "ours_sepred" the default with programmatic
dependent launch / with the separate reduce_parts kernel, "ours_s7" the default with session 7's
row kernels (LLMTRAIN_RMSLIN_ROWS=s7), "ours_pf" the default with the row pass's opt-in L2 prefetch
(LLMTRAIN_RMSLIN_PREFETCH=1), "ours_nat"
the extension's own backward data GEMM instead of cuBLAS's (LLMTRAIN_RMSLIN_DGRAD=native); all in
the same process.
`--impls ours,ours_pdl,compiled` measures a subset (eager always).
Prints a markdown table, one row per shape as soon as it is measured (a timeout keeps the rows
done); `--json PATH` also writes the numbers; `--shapes 0,1` picks shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import json
import os
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
        "ours_v3": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_ro": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_v2": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_sm80": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_pdl": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_s7": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_pf": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_sepred": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_nat": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_v6": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "ours_v6ro": lambda x, g, w: rmsnorm_linear(x, g, w, None, EPS),
        "eager": eager,
    }
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def liger(x, g, w):
            return F.linear(LigerRMSNormFunction.apply(x, g, EPS), w)

        impls["liger"] = liger
    except Exception as exc:  # not installed or API moved
        print(f"# liger unavailable: {exc}", file=sys.stderr)
    impls["compiled"] = torch.compile(eager)  # last: its first call compiles (seconds)
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


def measure(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


# Environment for an implementation while it is measured (read by the extension on every call).
# ours_ro: the fused forward's read-only variant (W diag(g) pre-pass; the GEMM only sums x^2).
# ours: the build's default (v2 forward: pre-pass + GEMM; v3 backward: register-resident row pass).
# ours_v2: the whole previous generation (LLMTRAIN_RMSLIN=v2).
# ours_sm80: the portable mma.sync path (what sm_80 / sm_120 run), forced on this GPU.
ENV = {"ours_v3": {"LLMTRAIN_RMSLIN": "v3"}, "ours_ro": {"LLMTRAIN_RMSLIN": "v3", "LLMTRAIN_RMSLIN_FWD": "ro"},
       "ours_v2": {"LLMTRAIN_RMSLIN": "v2"},
       "ours_sm80": {"LLMTRAIN_RMSLIN_SM80": "1"},
       # session 7 A/B: the default without programmatic dependent launch / with the separate
       # reduce_parts kernel instead of the row pass's fused last-block reduction
       "ours_pdl": {"LLMTRAIN_RMSLIN_PDL": "1"}, "ours_sepred": {"LLMTRAIN_RMSLIN_REDUCE": "kernel"},
       # session 8 A/B: session 7's row kernels (prep_fwd_rows, row_bwd_v3) instead of prep_fwd_s8 / row_bwd_s8
       "ours_s7": {"LLMTRAIN_RMSLIN_ROWS": "s7"},
       # session 8: the s8 row pass with its opt-in L2 prefetch of each warp's next row
       "ours_pf": {"LLMTRAIN_RMSLIN_PREFETCH": "1"},
       # session 11 A/B: the extension's own data GEMM instead of cuBLAS's (the session-10 default)
       "ours_nat": {"LLMTRAIN_RMSLIN_DGRAD": "native"},
       # ours_v6: the one-GEMM forward with x in registers (row sums and x * g there, no pre-pass);
       # ours_v6ro: the same GEMM on a W diag(g) pre-pass (A/B of the multiply).
       "ours_v6": {"LLMTRAIN_RMSLIN_FWD": "v6"}, "ours_v6ro": {"LLMTRAIN_RMSLIN_FWD": "v6ro"}}


@contextlib.contextmanager
def impl_env(name):
    """An implementation's environment (ENV) while it runs; the extension reads it on every call."""
    env = ENV.get(name, {})
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


def measure_with_env(name, fn):
    with impl_env(name):
        return measure(fn)


ROUNDS = 3  # every implementation once per round, median over rounds: clock / thermal drift over the
            # run hits all of them alike instead of whichever happens to be measured last


def run_shape(impls, n, k, m, rounds=ROUNDS):
    x, g, w, dy = inputs(n, k, m)
    shape = f"{n}x{k}->{m}"
    times = {"gemm": [], **{(mode, name): [] for name in impls for mode in ("fwd", "fwd_bwd")}}
    for rnd in range(rounds):
        times["gemm"].append(measure(gemm_fn(x, w)))
        for name, f in impls.items():
            times[("fwd", name)].append(measure_with_env(name, fwd_fn(f, x, g, w)))
            times[("fwd_bwd", name)].append(measure_with_env(name, fwd_bwd_fn(f, x, g, w, dy)))
            # Progress line per implementation, so a timeout still leaves the numbers measured so far.
            print(f"# {shape} round {rnd} {name} fwd {times[('fwd', name)][-1]:.4f} "
                  f"fwd+bwd {times[('fwd_bwd', name)][-1]:.4f}", flush=True)
    r = {"shape": shape, "gemm": statistics.median(times["gemm"]), "fwd": {}, "fwd_bwd": {}}
    for name in impls:
        r["fwd"][name] = statistics.median(times[("fwd", name)])
        r["fwd_bwd"][name] = statistics.median(times[("fwd_bwd", name)])
    del x, g, w, dy
    torch.cuda.empty_cache()
    return r


def run_all(shapes=SHAPES):
    impls = make_impls()
    return [run_shape(impls, *s) for s in shapes]


def header(names):
    ours = [n for n in names if n.startswith("ours")]
    hdr = "| shape | bare GEMM | " + " | ".join(f"fwd {n}" for n in names) + " | " + \
        " | ".join(f"{n}/GEMM" for n in ours) + " | " + " | ".join(f"fwd+bwd {n}" for n in names) + " | " + \
        " | ".join(f"eager/{n} fwd+bwd" for n in ours) + " |"
    return hdr + "\n|" + "---|" * (hdr.count("|") - 1)


def row_line(r):
    f, fb = r["fwd"], r["fwd_bwd"]
    names = list(f.keys())
    ours = [n for n in names if n.startswith("ours")]
    cells = [r["shape"], f"{r['gemm']:.3f}"] + [f"{f[n]:.3f}" for n in names] + \
        [f"{f[n] / r['gemm']:.3f}x" for n in ours] + [f"{fb[n]:.3f}" for n in names] + \
        [f"{fb['eager'] / fb[n]:.3f}x" for n in ours]
    return "| " + " | ".join(cells) + " |"


def table(rows):
    return "\n".join([header(list(rows[0]["fwd"].keys()))] + [row_line(r) for r in rows])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--shapes", help="comma-separated indices into SHAPES (default: all)")
    ap.add_argument("--out", help="comma-separated output widths m: rows 16384 x hidden 2048 -> m instead of SHAPES")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds per shape (default {ROUNDS})")
    ap.add_argument("--impls", help="comma-separated implementations to measure (default: all; eager is "
                    "always kept: the speed-up columns divide by it)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    if args.out:
        shapes = [(16384, 2048, int(m)) for m in args.out.split(",")]
    impls = make_impls()
    if args.impls:
        keep = set(args.impls.split(",")) | {"eager"}
        unknown = keep - set(impls)
        if unknown:
            ap.error(f"unknown implementations {sorted(unknown)}; known: {sorted(impls)}")
        impls = {name: f for name, f in impls.items() if name in keep}
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; times in ms (do_bench median)")
    print(header(list(impls.keys())), flush=True)
    rows = []
    for s in shapes:
        rows.append(run_shape(impls, *s, rounds=args.rounds))
        print(row_line(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
