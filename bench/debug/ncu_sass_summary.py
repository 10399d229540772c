"""Per-kernel summary of an `ncu --page source --csv --print-source sass` export (bench/device_ncu.sh writes one):
executed instructions and stall samples by opcode, and the hot straight-line blocks (runs of consecutive SASS
lines with one execution count: loop bodies, basic blocks) ranked by their share of the kernel's instructions.
Usage: python3 bench/debug/ncu_sass_summary.py source.csv[.gz] [blocks]"""
import csv
import gzip
import io
import sys
from collections import defaultdict


def kernels(path):
    """{kernel: [(address, executed, stall samples, source)]} in address order; the export repeats each
    line once per table, so the first copy is kept."""
    text = (gzip.open(path, "rt") if path.endswith(".gz") else open(path)).read()
    kern, hdr, data = None, None, {}
    for r in csv.reader(io.StringIO(text)):
        if not r:
            continue
        if r[0] == "Kernel Name":
            kern, hdr = r[1].split("(llmtrain")[0], None
            continue
        if "Source" in r and "Address" in r:
            hdr = r
            continue
        if hdr and len(r) == len(hdr):
            d = dict(zip(hdr, r))
            data.setdefault(kern, {}).setdefault(d["Address"], (
                int(d["Instructions Executed"] or 0), int(d["Warp Stall Sampling (All Samples)"] or 0),
                d["Source"].strip()))
    return {k: [(a, *v) for a, v in sorted(lines.items())] for k, lines in data.items()}


def opcode(src):
    tok = src.split()
    return (tok[1] if tok[0].startswith("@") and len(tok) > 1 else tok[0]).split(".")[0]


def main(path, most=8):
    for kern, lines in kernels(path).items():
        total = sum(ex for _, ex, _, _ in lines) or 1
        stalls = sum(st for _, _, st, _ in lines) or 1
        print(f"## {kern}: {total:.3e} warp instructions, {stalls} stall samples")
        ops = defaultdict(lambda: [0, 0])
        for _, ex, st, src in lines:
            ops[opcode(src)][0] += ex
            ops[opcode(src)][1] += st
        print("by opcode (% of instructions, % of stall samples):")
        for op, (ex, st) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:20]:
            print(f"  {op:10s} {100 * ex / total:5.1f}%  {100 * st / stalls:5.1f}%")
        blocks = []
        for addr, ex, st, src in lines:
            if blocks and blocks[-1]["ex"] == ex:
                blocks[-1]["src"].append(src)
                blocks[-1]["st"] += st
            else:
                blocks.append({"addr": addr, "ex": ex, "st": st, "src": [src]})
        blocks.sort(key=lambda b: -b["ex"] * len(b["src"]))
        print("hot blocks (% of instructions, instructions x executions, opcode mix):")
        for b in blocks[:most]:
            mix = defaultdict(int)
            for s in b["src"]:
                mix[opcode(s)] += 1
            top = ", ".join(f"{o} {c}" for o, c in sorted(mix.items(), key=lambda kv: -kv[1])[:8])
            print(f"  {100 * b['ex'] * len(b['src']) / total:5.1f}%  {len(b['src']):4d} x {b['ex']:.2e} at {b['addr']}"
                  f" ({100 * b['st'] / stalls:.1f}% of stall samples): {top}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
