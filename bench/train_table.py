"""Collect bench/device_train.sh's rows (<row>.json from `llmtrain bench train --json`) into one markdown
table on stdout and results.json beside them. A row without JSON (timeout, crash, skipped) gets the
last line of its log."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, spec):
    return "-" if value is None else format(value, spec)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    rows, reports = [], []
    for log in sorted(out.glob("*.log")):
        name = log.stem
        path = out / f"{name}.json"
        if path.exists():
            report = json.loads(path.read_text())
            reports.append({"row": name, **report})
            for r in report["rows"]:
                rows.append((name, r, report))
        else:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            rows.append((name, {"model": "-", "status": "no result", "error": lines[-1][:160] if lines else ""}, {}))
    device = next((r.get("device") for r in reports if r.get("device")), "?")
    print(f"device: {device}; " + (f"date {reports[0]['date']}; torch {reports[0]['torch']}" if reports else ""))
    if reports:
        print(f"MFU FLOPs/token: {reports[0]['flop_formula']}; peak {reports[0]['peak_tflops']} TFLOP/s\n")
    print("| row | model | backend | seq x batch x accum | params | tok/s | MFU | step ms (median) | peak GiB "
          "(reserved) | cap GiB | loss first->last | vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r, report in rows:
        if r.get("status") != "ok":
            print(f"| {name} | {r.get('model')} | | | | **{r.get('status')}** | | | | "
                  f"{_f(report.get('memory_cap_gib'), 'g')} | {r.get('error', '')} | |")
            continue
        ratio = report.get("speedup_vs_baseline") if not r["model"].endswith("-baseline") else None
        print(f"| {name} | {r['model']} | {r['backend']}{' +compile' if r.get('compile') else ''}"
              f"{' +ckpt' if r.get('activation_checkpointing') else ''} | {r['seq_len']} x {r['batch_size']} x "
              f"{r['grad_accum']} | {r['params'] / 1e6:.0f}M | {r['tokens_per_s']:,.0f} | "
              f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['step_ms_median']:.1f} | "
              f"{_f(r['peak_mem_gib'], '.2f')} ({_f(r['peak_reserved_gib'], '.2f')}) | "
              f"{_f(report.get('memory_cap_gib'), 'g')} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} | "
              f"{'-' if ratio is None else format(ratio, '.2f') + 'x'} |")
    (out / "results.json").write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/train")
