"""Per-kernel SASS opcode summary of an `ncu --page source --csv --print-source sass` export: executed
instructions and stall samples by opcode, and the costliest lines. Usage: python3 ncu_opcode_summary.py source.csv[.gz]"""
import csv
import gzip
import io
import sys
from collections import defaultdict


def rows(path):
    raw = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
    return list(csv.reader(io.StringIO(raw.read())))


def main(path):
    table = rows(path)
    kernel, header, stats = "?", None, {}
    for r in table:
        if not r:
            continue
        if r[0] == "Kernel Name":  # one section per profiled launch; launches of one kernel add up
            kernel = r[1].split("(llmtrain")[0][:110]
            header = None
            continue
        if "Source" in r and any("Instructions Executed" in c for c in r):
            header = r
            continue
        if header is None or len(r) != len(header):
            continue
        d = dict(zip(header, r))
        src = d.get("Source", "").strip()
        op = src.split()[0] if src else "?"
        if op.startswith("@"):
            op = src.split()[1] if len(src.split()) > 1 else op
        op = op.split(".")[0]
        ex = next((c for c in header if c.startswith("Instructions Executed")), None)
        st = next((c for c in header if c.startswith("Warp Stall Sampling (All")), None)

        def num(c):
            try:
                return float(d[c].replace(",", "")) if c else 0.0
            except ValueError:
                return 0.0
        k = stats.setdefault(kernel, {"ops": defaultdict(lambda: [0.0, 0.0]), "lines": []})
        k["ops"][op][0] += num(ex)
        k["ops"][op][1] += num(st)
        k["lines"].append((num(st), num(ex), src[:70]))
    for kernel, k in stats.items():
        tot_e = sum(v[0] for v in k["ops"].values()) or 1
        tot_s = sum(v[1] for v in k["ops"].values()) or 1
        print(f"## {kernel}\n{tot_e:.3e} instructions executed, {tot_s:.0f} stall samples")
        for op, (e, s) in sorted(k["ops"].items(), key=lambda kv: -kv[1][0])[:25]:
            print(f"  {op:12s} {100 * e / tot_e:5.1f}% of instructions  {100 * s / tot_s:5.1f}% of stall samples")
        print("  costliest lines (stall samples):")
        merged = defaultdict(lambda: [0.0, 0.0])
        for s, e, src in k["lines"]:
            merged[src][0] += s
            merged[src][1] += e
        for src, (s, e) in sorted(merged.items(), key=lambda kv: -kv[1][0])[:15]:
            print(f"    {100 * s / tot_s:5.1f}%  {e:.2e}  {src}")


if __name__ == "__main__":
    main(sys.argv[1])
