"""Hot straight-line blocks of each kernel in an `ncu --page source --csv --print-source sass` export: runs of
consecutive SASS lines with the same execution count (a loop body or a basic block), ranked by their share of the
kernel's executed instructions, with their opcode mix. Usage: python3 ncu_hot_blocks.py source.csv[.gz] [N]"""
import csv
import gzip
import io
import sys


def main(path, most=8):
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
            lines = data.setdefault(kern, {})
            if d["Address"] not in lines:  # the export repeats each line once per table
                lines[d["Address"]] = (int(d["Instructions Executed"] or 0),
                                       int(d["Warp Stall Sampling (All Samples)"] or 0), d["Source"].strip())
    for kern, lines in data.items():
        items = sorted(lines.items())
        total = sum(v[0] for _, v in items) or 1
        blocks = []
        for addr, (ex, st, src) in items:
            if blocks and blocks[-1]["ex"] == ex:
                blocks[-1]["n"] += 1
                blocks[-1]["st"] += st
                blocks[-1]["src"].append(src)
            else:
                blocks.append({"addr": addr, "ex": ex, "n": 1, "st": st, "src": [src]})
        blocks.sort(key=lambda b: -b["ex"] * b["n"])
        print(f"## {kern}: {total:.3e} warp instructions")
        for b in blocks[:most]:
            ops = {}
            for s in b["src"]:
                tok = s.split()
                op = (tok[1] if tok[0].startswith("@") and len(tok) > 1 else tok[0]).split(".")[0]
                ops[op] = ops.get(op, 0) + 1
            mix = ", ".join(f"{o} {c}" for o, c in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
            print(f"  {100 * b['ex'] * b['n'] / total:5.1f}%  {b['n']:4d} instructions x {b['ex']:.2e}  at {b['addr']}  "
                  f"stall samples {b['st']}: {mix}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8)
