#!/usr/bin/env bash
# Issue 12 on a 2-GPU machine (nvidia-h200-x2): 1 vs 2 GPUs with the same global batch (losses and
# tokens/s) for a 125M retention model and the 1B MLA model, and checkpoints resumed across world sizes.
# Usage (device): bash bench/device_distributed.sh  with the prepared bundled shards carried in .carry/shards
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Cbuild-dir=/tmp/llmtrain-build
python3 -m llmtrain info | tee "$OUT/info.txt"
DATA=$PWD/.carry/shards
common=(--dataset "$DATA" --seq_len 1024 --eval_interval 100000 --save_interval 100000 --log_interval 1
        --progress false --sample_tokens 1 --warmup_steps 5 --dtype bf16 --device cuda)
one() { CUDA_VISIBLE_DEVICES=0 python3 -m llmtrain pretrain "${common[@]}" "$@"; }
two() { torchrun --nproc_per_node 2 --master_port 29511 -m llmtrain pretrain "${common[@]}" "$@"; }
small=(--model_size small --model_overrides "{vocab_size: 50304}" --max_steps 50)
big=(--model_size mla-1b --model_overrides "{vocab_size: 50304}" --max_steps 20)
one "${small[@]}" --batch_size 8 --output_dir "$OUT/run/small_1gpu" > "$OUT/small_1gpu.log" 2>&1
two "${small[@]}" --batch_size 4 --output_dir "$OUT/run/small_2gpu" > "$OUT/small_2gpu.log" 2>&1
one "${big[@]}" --batch_size 8 --output_dir "$OUT/run/big_1gpu" > "$OUT/big_1gpu.log" 2>&1
two "${big[@]}" --batch_size 4 --output_dir "$OUT/run/big_2gpu" > "$OUT/big_2gpu.log" 2>&1
two "${small[@]}" --batch_size 4 --stop_at_step 20 --output_dir "$OUT/run/two_to_one" > "$OUT/resume_a.log" 2>&1
one "${small[@]}" --batch_size 8 --resume latest --output_dir "$OUT/run/two_to_one" > "$OUT/resume_b.log" 2>&1
one "${small[@]}" --batch_size 8 --stop_at_step 20 --output_dir "$OUT/run/one_to_two" > "$OUT/resume_c.log" 2>&1
two "${small[@]}" --batch_size 4 --resume latest --output_dir "$OUT/run/one_to_two" > "$OUT/resume_d.log" 2>&1
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
out = sys.argv[1]
def load(name):
    rows = [json.loads(l) for l in open(f"{out}/run/{name}/metrics.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}
def tok_s(m, skip=5):  # median over steps after warm-up
    return statistics.median(r["tokens_per_s"] for s, r in m.items() if s > skip)
print("| model | 1 GPU tok/s | 2 GPU tok/s | scaling | max abs loss diff (all steps) | peak mem 1 GPU (GiB) |")
print("|---|---|---|---|---|---|")
for label, a, b in (("retention small (124M)", "small_1gpu", "small_2gpu"), ("MLA 1B", "big_1gpu", "big_2gpu")):
    m1, m2 = load(a), load(b)
    diff = max(abs(m1[s]["loss"] - m2[s]["loss"]) for s in m1 if s in m2)
    t1, t2 = tok_s(m1), tok_s(m2)
    print(f"| {label} | {t1:,.0f} | {t2:,.0f} | {t2 / t1:.2f}x | {diff:.4f} | {max(r.get('peak_mem_gib', 0) for r in m1.values()):.1f} |")
ref = load("small_1gpu")
for name in ("two_to_one", "one_to_two"):
    m = load(name)
    diff = max(abs(m[s]["loss"] - ref[s]["loss"]) for s in m if s > 20)
    print(f"resume {name}: steps 21-50 max abs loss diff vs uninterrupted 1-GPU run = {diff:.4f}")
print("losses 1 GPU small:", [round(ref[s]["loss"], 4) for s in sorted(ref)][::5])
print("losses 2 GPU small:", [round(r["loss"], 4) for s, r in sorted(load("small_2gpu").items())][::5])
PY
