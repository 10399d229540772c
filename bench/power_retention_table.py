"""One table: llmtrain power retention vs retention 1.0.7 (chunk 128 and 1024), torch SDPA causal
(FlashAttention) and flash-linear-attention's chunk_simple_gla, all measured in this run on one GPU.

bf16, deg 2, 8 heads, 65,536 tokens per batch (b = 65536 / t), gated (log_g = logsigmoid), forward
and forward+backward, medians of triton.testing.do_bench; plus decode-step latency (one token)
at batch 1 and 64. FLOP counts (printed as achieved TFLOP/s):
  power retention (ours and retention): forward = b h t [4 D (d+1) + 2 c (2d+1)], D = d(d+1)/2, c = 256
    (state update + state query over the canonical features, causal half of a 256-token intra-chunk
    block); forward+backward = 3x forward. The same count for every power-retention implementation,
    so TFLOP/s compare like with like (retention's blocked layout does ~23% more work than counted).
  SDPA causal: forward = 2 b h t^2 d (causal half of 4 b h t^2 d); forward+backward = 3.5x.
  chunk_simple_gla: forward = b h t [4 d d + 2 c (2d)] with c = 64; forward+backward = 3x.

Usage: python bench/power_retention_table.py [--d 64 128] [--t 2048 8192 32768 65536] [--json out.json]
       [--only ours-v1,ours-v2,ours-v3,ours-v4,sdpa-causal,fla-simple-gla,retention-c128,retention-c1024] [--no-bwd]
       [--no-fwd] [--no-decode]. ours-vN: LLMTRAIN_RETENTION_KERNEL=vN
       (v3 and v4 keep the forward's chunk states for the backward); ours-vN-cC: that generation at chunk C
       (128, 256, 512, 1024; without -cC: default_chunk_size). Rows named in --only are the only ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

TOKENS = 65536
H = 8


def med(fn, warmup=25, rep=100):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def flops_power(b, t, d, bwd):
    D = d * (d + 1) // 2
    f = b * H * t * (4 * D * (d + 1) + 2 * 256 * (2 * d + 1))
    return 3 * f if bwd else f


def flops_sdpa(b, t, d, bwd):
    f = 2 * b * H * t * t * d
    return 3.5 * f if bwd else f


def flops_gla(b, t, d, bwd):
    f = b * H * t * (4 * d * d + 2 * 64 * 2 * d)
    return 3 * f if bwd else f


def inputs(b, t, d, grad):
    g = torch.Generator(device="cuda")
    g.manual_seed(0)
    q = torch.randn(b, t, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(b, t, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, t, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
    log_g = F.logsigmoid(torch.randn(b, t, H, device="cuda", generator=g) + 3.0)
    if grad:
        q, k, v, log_g = (x.requires_grad_(True) for x in (q, k, v, log_g))
    return q, k, v, log_g


def make_impls(d):
    impls = {}
    from llmtrain.ops.power_retention.op import power_retention

    # All kernel generations in the same run (the extension reads LLMTRAIN_RETENTION_KERNEL per
    # call; set before the forward, it also holds for the backward that follows).
    def ours(ver, chunk=None, flash=""):
        def fn(q, k, v, g):
            os.environ["LLMTRAIN_RETENTION_KERNEL"] = ver
            os.environ["LLMTRAIN_RETENTION_FLASH"] = flash
            return power_retention(q, k, v, g, chunk_size=q.shape[1] if chunk == "single" else chunk)
        return fn

    impls["ours"] = (ours(""), flops_power)  # the build's default generation and chunk size
    # session 11: the one-chunk flash kernels with the v12 dq (ours-f12) and with the pipelined forward
    # too (ours-f14all)
    # session 13: "ours" is v16 (row statistics in dq); ours-f14 the session-11 default
    impls["ours-f14"] = (ours("", flash="v14"), flops_power)
    # session 14: "ours" is v17 (wgmma flash kernels on sm_90, d = 64); ours-f16 the session-13 default
    impls["ours-f16"] = (ours("", flash="v16"), flops_power)
    impls["ours-f17"] = (ours("", flash="v17"), flops_power)
    impls["ours-f12"] = (ours("", flash="v12"), flops_power)
    impls["ours-f14all"] = (ours("", flash="v14-all"), flops_power)
    # session 15: "ours" is v18 (the chunked backward's state parts on wgmma); ours-v12 the chunked
    # path before it
    # session 17: v20 (the LOCAL scan stages up to 512 rows), v21 (+ the forward's state query on wgmma)
    for ver in ("v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v18", "v20", "v21"):
        impls[f"ours-{ver}"] = (ours(ver), flops_power)
        # chunk-size sweep (ours-v3-c512 etc.): default_chunk_size picks one per d from these rows;
        # -single: the whole sequence as one chunk (v7 and later: up to 8192 tokens, else 1024)
        for c in (128, 256, 512, 1024, 2048, 4096, 8192, "single"):
            impls[f"ours-{ver}-{c if c == 'single' else f'c{c}'}"] = (ours(ver, c), flops_power)
    def sdpa(q, k, v, g):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    impls["sdpa-causal"] = (sdpa, flops_sdpa)
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        def gla(q, k, v, g):
            o, _ = chunk_simple_gla(q, k, v, g=g, scale=1 / math.sqrt(d))
            return o

        impls["fla-simple-gla"] = (gla, flops_gla)
    except Exception as e:  # noqa: BLE001
        print(f"# flash-linear-attention unavailable: {e!r}", file=sys.stderr)
    try:
        from retention.triton import power_retention as ret

        for c in (128, 1024):
            impls[f"retention-c{c}"] = (
                lambda q, k, v, g, c=c: ret(Q=q, K=k, V=v, log_G=g, deg=2, scale=1 / math.sqrt(d), chunk_size=c),
                flops_power)
    except Exception as e:  # noqa: BLE001
        print(f"# retention unavailable: {e!r}", file=sys.stderr)

    return impls


def bench_one(fn, b, t, d, bwd):
    q, k, v, g = inputs(b, t, d, bwd)
    if not bwd:
        with torch.no_grad():
            return med(lambda: fn(q, k, v, g))
    y = fn(q, k, v, g)
    dy = torch.randn_like(y)

    def step():
        for x in (q, k, v, g):
            x.grad = None
        fn(q, k, v, g).backward(dy)

    return med(step)


def decode_latency(b, d):
    from llmtrain.ops.power_retention.op import RetentionState, power_retention_step

    D = d * (d + 1) // 2
    q = torch.randn(b, 1, H, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    lg = F.logsigmoid(torch.randn(b, 1, H, device="cuda") + 3.0)
    S = torch.randn(b, H, D, d, device="cuda") * 1e-2
    z = torch.rand(b, H, D, device="cuda") + 1.0
    st = RetentionState(S, z)
    with torch.no_grad():
        return med(lambda: power_retention_step(q, k, v, lg, state=st, inplace=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--t", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--only", default="")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--no-fwd", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-kernels", default="v1,v3", help="LLMTRAIN_RETENTION_KERNEL values for the decode rows")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    rows = []
    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    modes = ([] if args.no_fwd else ["fwd"]) + ([] if args.no_bwd else ["fwd+bwd"])
    for d in (args.d if modes else []):  # (decode only: skip importing the other implementations)
        impls = make_impls(d)
        for mode in modes:
            for t in args.t:
                b = TOKENS // t
                for name, (fn, fl) in impls.items():
                    if (only and name not in only) or (not only and name.startswith("ours-") and ("-c" in name or name.endswith("-single"))):
                        continue
                    try:
                        ms = bench_one(fn, b, t, d, mode == "fwd+bwd")
                        tf = fl(b, t, d, mode == "fwd+bwd") / ms / 1e9
                        err = ""
                    except Exception as e:  # noqa: BLE001
                        ms, tf, err = float("nan"), float("nan"), repr(e)[:120]
                    torch.cuda.empty_cache()
                    rows.append(dict(d=d, mode=mode, t=t, b=b, impl=name, ms=ms, tflops=tf, err=err))
                    print(f"d={d:<4} {mode:<8} t={t:<6} b={b:<3} {name:<16} {ms:9.3f} ms {tf:7.1f} TFLOP/s {err}",
                          flush=True)
    dec_vers = args.decode_kernels.split(",")
    for d in ([] if args.no_decode else args.d):
        for ver in dec_vers:
            os.environ["LLMTRAIN_RETENTION_KERNEL"] = ver
            for b in (1, 64):
                try:
                    ms = decode_latency(b, d)
                except Exception as e:  # noqa: BLE001
                    ms = float("nan")
                    print(f"# decode failed: {e!r}", file=sys.stderr)
                rows.append(dict(d=d, mode="decode", t=1, b=b, impl=f"ours-{ver}", ms=ms, tflops=float("nan"), err=""))
                print(f"d={d:<4} decode   b={b:<3} ours-{ver} {ms * 1e3:9.1f} us", flush=True)
    # markdown table
    print()
    for d in args.d:
        for mode in modes:
            names = [n for n in dict.fromkeys(r["impl"] for r in rows if r["d"] == d and r["mode"] == mode)]
            print(f"\n**d = {d}, {mode}** (ms; TFLOP/s in brackets)\n")
            print("| t | b | " + " | ".join(names) + " |")
            print("|---|---|" + "---|" * len(names))
            for t in args.t:
                cells = []
                for n in names:
                    r = next((r for r in rows if r["d"] == d and r["mode"] == mode and r["t"] == t and r["impl"] == n), None)
                    cells.append("" if r is None or math.isnan(r["ms"]) else f"{r['ms']:.2f} ({r['tflops']:.0f})")
                print(f"| {t} | {TOKENS // t} | " + " | ".join(cells) + " |")
    if not args.no_decode:  # (--no-decode: no decode rows, so no empty table either)
        print("\n**decode step, one token, 8 heads (us)**\n")
        print("| d | kernel | batch 1 | batch 64 |\n|---|---|---|---|")
    for d in ([] if args.no_decode else args.d):
        for ver in dec_vers:
            c = [next((r["ms"] for r in rows if r["mode"] == "decode" and r["d"] == d and r["b"] == b
                       and r["impl"] == f"ours-{ver}"), float("nan")) for b in (1, 64)]
            print(f"| {d} | {ver} | {c[0] * 1e3:.1f} | {c[1] * 1e3:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
