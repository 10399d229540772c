"""Summary of bench/device_distributed.sh's runs (issue 12): 1 GPU against 2 GPUs.

    python bench/distributed_summary.py RUNS_DIR      # markdown on stdout; exit 1 if a check fails

Each run directory holds the trainer's metrics.jsonl (rank 0: the loss averaged over ranks, and
tokens/s of the whole job). Three tables:
- same global batch (1 x 8 against 2 x 4 sequences), each engine against itself on one GPU (FSDP2
  over a group of one, DeepSpeed on one process): the 2-GPU losses must stay within TOL of the
  1-GPU losses at every step; tokens/s ratio (strong scaling);
- same batch per GPU (1 x 8 against 2 x 8, and with 4 accumulated micro-batches per step): tokens/s
  ratio (weak scaling, the usual data-parallel figure: each GPU does the same work, so the ratio
  shows what the communication costs);
- resume across world sizes: a checkpoint written at step 20 by one world size, steps 21-50 on the
  other, against the uninterrupted run that wrote it (steps 1-20 are the same computation, so they
  should be identical; after step 20 only the world size, and for FSDP2 the engine, differ).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4%) and 1 and 2 GPUs reduce in another
# order, so two correct runs drift apart a little; a wrong reduction (a sum instead of a mean, a rank
# training on the other's data) moves the loss by far more within a few steps at lr 3e-4.
TOL = 0.01  # |loss(2 GPUs) - loss(1 GPU)| <= 1% of the 1-GPU loss at every step compared
WARMUP_STEPS = 5  # tokens/s: median over the steps after these

MODELS = {"small": "retention small (124M), 50 steps", "big": "MLA 1B, 20 steps"}
# run-name suffix -> (engine, the one-GPU run of the same engine it is compared with)
ENGINES = {
    "ddp": ("DDP", "{m}_1gpu"),
    "fsdp": ("FSDP2", "{m}_fsdp1gpu"),
    "dsgpu": ("DeepSpeed ZeRO-2 (deepspeed launcher)", "{m}_ds1gpu"),
    "dscpu": ("DeepSpeed ZeRO-2 + CPU Adam offload", "{m}_ds1gpu"),
}
RESUMES = {  # name -> (what it shows, the uninterrupted run of the engine that saved the checkpoint)
    "ddp_2to1": ("DDP on 2 GPUs -> 1 GPU", "small_ddp"),
    "ddp_1to2": ("1 GPU -> DDP on 2 GPUs", "small_1gpu"),
    "fsdp_2to1": ("FSDP2 on 2 GPUs -> 1 GPU (plain)", "small_fsdp"),
    "fsdp_1to2": ("1 GPU (plain) -> FSDP2 on 2 GPUs", "small_1gpu"),
    "ds_2to1": ("DeepSpeed ZeRO-2 on 2 GPUs -> 1 GPU", "small_dsgpu"),
}
WEAK = {  # run-name suffix -> the batch per GPU and optimizer step
    "": "8 x 1024",
    "_32k": "32K tokens (124M: 32 x 1024; 1B: 8 x 1024 x 4 accumulated)",
}


def load(runs: Path, name: str) -> dict[int, dict] | None:
    path = runs / name / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}  # a resumed run's log continues after its step


def tokens_per_s(m: dict[int, dict]) -> float:
    timed = [r["tokens_per_s"] for s, r in m.items() if s > WARMUP_STEPS]
    return statistics.median(timed) if timed else float("nan")


def peak_gib(m: dict[int, dict]) -> float:
    return max(r.get("peak_mem_gib", 0.0) for r in m.values())


def compare(ref: dict[int, dict], m: dict[int, dict], first: int = 1, verdict: bool = True) -> tuple[bool, str]:
    """(within TOL at every common step from `first`, a one-line description; with verdict=False the
    description leaves out PASS/FAIL, for comparisons shown for information only)."""
    steps = [s for s in sorted(ref) if s in m and s >= first]
    if not steps:
        return False, "no common steps: FAIL"
    rel = {s: abs(m[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in steps}
    worst = max(steps, key=rel.get)
    ok = all(r <= TOL for r in rel.values())
    biggest = max(abs(m[s]["loss"] - ref[s]["loss"]) for s in steps)
    text = f"{biggest:.4f} over steps {steps[0]}-{steps[-1]} (worst {rel[worst]:.2%} at step {worst})"
    return ok, f"{text} {'PASS' if ok else 'FAIL'}" if verdict else text


def summarize(runs: Path) -> tuple[str, list[str]]:
    lines, failed = [], []
    out = lines.append
    out(f"Tolerance: |loss(2 GPUs) - loss(1 GPU)| <= {TOL:.0%} of the 1-GPU loss at every step (bf16). "
        f"tokens/s: median over the steps after step {WARMUP_STEPS}.\n")
    out("Same global batch (1 GPU x 8 sequences of 1024 tokens against 2 GPUs x 4):\n")
    out("| model | engine | 1 GPU tok/s | 2 GPUs tok/s | scaling | loss: max abs diff vs 1 GPU | "
        "peak GiB 1 GPU / 2 GPUs (rank 0) |")
    out("|---|---|---|---|---|---|---|")
    for model, label in MODELS.items():
        for suffix, (engine, ref_name) in ENGINES.items():
            ref, m = load(runs, ref_name.format(m=model)), load(runs, f"{model}_{suffix}")
            if ref is None or m is None:
                continue
            ok, text = compare(ref, m)
            if not ok:
                failed.append(f"{model} {engine}")
            t1, t2 = tokens_per_s(ref), tokens_per_s(m)
            out(f"| {label} | {engine} | {t1:,.0f} | {t2:,.0f} | {t2 / t1:.2f}x | {text} | "
                f"{peak_gib(ref):.1f} / {peak_gib(m):.1f} |")
    for model, label in MODELS.items():  # for information: FSDP2's bf16 weights against autocast
        ref, m = load(runs, f"{model}_1gpu"), load(runs, f"{model}_fsdp")
        if ref is not None and m is not None:
            out(f"\n{label}, FSDP2 on 2 GPUs against plain DDP-style autocast on 1 GPU (another numerics: "
                f"FSDP2 computes with bf16 weights): {compare(ref, m, verdict=False)[1]}")
    weak = [(label, how, load(runs, f"{model}_1gpu{acc}"), load(runs, f"{model}_ddp{acc or 'weak'}"))
            for model, label in MODELS.items() for acc, how in WEAK.items()]
    weak = [w for w in weak if w[2] is not None and w[3] is not None]
    if weak:
        out("\nSame batch per GPU (DDP):\n")
        out("| model | batch per GPU and step | 1 GPU tok/s | 2 GPUs tok/s | scaling | peak GiB 1 GPU / 2 GPUs (rank 0) |")
        out("|---|---|---|---|---|---|")
        for label, how, ref, m in weak:
            t1, t2 = tokens_per_s(ref), tokens_per_s(m)
            out(f"| {label.split(',')[0]} | {how} | {t1:,.0f} | {t2:,.0f} | {t2 / t1:.2f}x | "
                f"{peak_gib(ref):.1f} / {peak_gib(m):.1f} |")
    resumed = [(name, what, load(runs, ref_name), load(runs, name)) for name, (what, ref_name) in RESUMES.items()]
    resumed = [r for r in resumed if r[3] is not None]
    if resumed:
        out("\nResume across world sizes (checkpoint at step 20; steps 21-50 against the uninterrupted run):\n")
        out("| run | steps 1-20 identical to the uninterrupted run | steps 21-50: max abs loss diff |")
        out("|---|---|---|")
        for name, what, ref, m in resumed:
            if ref is None:
                failed.append(f"resume {name}")
                out(f"| {what} | - | no uninterrupted reference run: FAIL |")
                continue
            ok, text = compare(ref, m, first=21)
            if not ok or max(m) < max(ref):
                failed.append(f"resume {name}")
            same = all(s in m and m[s]["loss"] == ref[s]["loss"] for s in range(1, 21) if s in ref)
            out(f"| {what} | {'yes' if same else 'no'} | "
                f"{text}{'' if max(m) >= max(ref) else f' (stopped at step {max(m)}: FAIL)'} |")
    for name in ("small_1gpu", "small_ddp", "small_fsdp", "small_ds1gpu", "small_dsgpu"):
        m = load(runs, name)
        if m is not None:
            out(f"\nlosses {name} (every 5th step): {[round(m[s]['loss'], 4) for s in sorted(m)][::5]}")
    if failed:
        out("\nOUTSIDE TOLERANCE: " + ", ".join(failed))
    return "\n".join(lines), failed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    runs = Path(argv[1])
    if not any(runs.glob("*/metrics.jsonl")):
        print(f"{runs}: no run directories with a metrics.jsonl", file=sys.stderr)
        return 2
    text, failed = summarize(runs)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
