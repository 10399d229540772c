#!/usr/bin/env bash
# One device call for issue 13 (end-to-end training): `llmtrain bench train` rows, most important first.
# Usage (repo root, llmtrain and the carried wheels already installed by the lead's wrapper):
#   BUDGET_S=150 bash bench/device_train.sh
# Nothing is installed or built here. Each row is its own process under `timeout` (min(row cap, time
# left)); rows that do not fit the budget are skipped with a line saying so.
#   a. retention small (125M) at 2K, eager, vs the torch.compile'd GPT-2-124M SDPA baseline (same process)
#   b. retention 1B-class (2048 x 20, 32 heads) at 2K   i. retention small at 64K (linear cost vs a)
#   c. MLA 1B at 2K   d. pretrain_5080 (MLA 1B, ZeRO-2 + CPU offload) under a 16 GiB allocator cap
#   then, while time remains: retention small / 1B and MLA 1B at 16K, longctx_5090 under the cap,
#   retention 1B and MLA 1B at 2K with torch.compile (--compile true: the Trainer's compile path;
#   warm-up steps absorb the compilation), a profiled retention-1b step (p), the Llama baseline at 2K.
# TRAIN_ROWS="f g h e" runs only those rows (by letter), in this file's order.
# CPU dry run: BUDGET_S=60 BENCH_EXTRA_ARGS="--device cpu --seq_len 16 ..." bash bench/device_train.sh
# Results under $OUT/train/: <row>.json (llmtrain bench train --json), <row>.log, table.md and
# results.json (all rows, bench/train_table.py).
set -uo pipefail
OUT_DIR=${OUT:-$PWD/out}/train
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
T_END=$(( $(date +%s) + ${BUDGET_S:-150} ))
left() { echo $(( T_END - $(date +%s) )); }
HAVE_DS=0
python3 -c "import deepspeed" >/dev/null 2>&1 && HAVE_DS=1

# row NAME CAP_S MIN_S args...: run `llmtrain bench train args` if at least MIN_S seconds are left.
row() {
  local name=$1 cap=$2 min=$3; shift 3
  # TRAIN_ROWS="f g h": only rows whose letter (the name up to its first "_") is listed
  if [ -n "${TRAIN_ROWS:-}" ] && [[ " $TRAIN_ROWS " != *" ${name%%_*} "* ]]; then return; fi
  local l; l=$(left)
  if [ "$l" -lt "$min" ]; then
    echo "== $name: SKIPPED (${l}s left, needs ${min}s)" | tee "$OUT_DIR/$name.log"; return
  fi
  [ "$l" -lt "$cap" ] && cap=$l
  echo "== $name (timeout ${cap}s): llmtrain bench train $*"
  # BENCH_EXTRA_ARGS (appended, so they win): for a CPU dry run of this script at tiny sizes
  # shellcheck disable=SC2086
  timeout -k 5 "$cap" python3 -m llmtrain bench train "$@" ${BENCH_EXTRA_ARGS:-} --json "$OUT_DIR/$name.json" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "TIMEOUT after ${cap}s" >>"$OUT_DIR/$name.log"
  grep -E "tok/s|OOM|ERROR|Error|TIMEOUT|x tokens/s" "$OUT_DIR/$name.log" | tail -4
  echo "   rc=$rc"
}
ds_row() {  # DeepSpeed rows need the deepspeed package (only there if carried)
  if [ "$HAVE_DS" = 1 ]; then row "$@"; else
    echo "== $1: SKIPPED (deepspeed is not importable here)" | tee "$OUT_DIR/$1.log"; fi
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"

# The analytic memory estimates (CPU only, in the background so they take no row time; .txt/.json, not
# table rows) to sit beside the measured 16 GiB rows d and e.
( for preset in pretrain_5080 longctx_5090; do
    python3 -m llmtrain bench memory --config $preset --json "$OUT_DIR/estimate_$preset.json" \
      >"$OUT_DIR/estimate_$preset.txt" 2>&1
  done ) &
ESTIMATES=$!

row a_small_2k_vs_gpt2 80 45 --model small --seq_len 2048 --batch_size 16 --steps 8 --warmup 3 --baseline gpt2
row b_retention1b_2k 40 25 --model retention-1b --seq_len 2048 --batch_size 8 --steps 6 --warmup 2
row i_small_64k 35 20 --model small --seq_len 65536 --batch_size 1 --steps 4 --warmup 2
row c_mla1b_2k 40 25 --model mla-1b --seq_len 2048 --batch_size 8 --steps 6 --warmup 2
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  ds_row d_pretrain_5080_16gb 120 60 --config pretrain_5080 --memory_cap_gb 16 --steps 2 --warmup 1
row f_small_16k 35 20 --model small --seq_len 16384 --batch_size 2 --steps 5 --warmup 2
row g_retention1b_16k 40 25 --model retention-1b --seq_len 16384 --batch_size 1 --steps 4 --warmup 2
row h_mla1b_16k 40 25 --model mla-1b --seq_len 16384 --batch_size 1 --steps 4 --warmup 2
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  ds_row e_longctx_5090_16gb 100 50 --config longctx_5090 --memory_cap_gb 16 --grad_accum 2 --steps 2 --warmup 1
row e2_retention1b_2k_compiled 120 70 --model retention-1b --seq_len 2048 --batch_size 8 --steps 6 --warmup 3 --compile true
row e3_mla1b_2k_compiled 120 70 --model mla-1b --seq_len 2048 --batch_size 8 --steps 6 --warmup 3 --compile true
# p: where the retention-1b step goes (torch.profiler table of the last timed steps)
row p_retention1b_2k_profile 60 35 --model retention-1b --seq_len 2048 --batch_size 8 --steps 4 --warmup 2 \
  --profile "$OUT_DIR/p_retention1b_2k_profile.txt"
row j_mla1b_2k_vs_llama 130 100 --model mla-1b --seq_len 2048 --batch_size 8 --steps 5 --warmup 3 --baseline llama
# k / kc: the host-bound small step (8 x 1024 took ~47 ms on an H200 whatever the batch; perf.md,
# "Distributed"): eager against compiled, and the exact CUDA operator count beside them
row k_small_1k 40 25 --model small --seq_len 1024 --batch_size 8 --steps 20 --warmup 5
row kc_small_1k_compiled 120 70 --model small --seq_len 1024 --batch_size 8 --steps 20 --warmup 5 --compile true
if [ -z "${TRAIN_ROWS:-}" ] || [[ " $TRAIN_ROWS " == *" k "* ]]; then
  timeout 120 python3 bench/host_ops.py --model small --device cuda > "$OUT_DIR/k_host_ops_cuda.txt" 2>&1 || true
fi

wait "$ESTIMATES"
grep -h ESTIMATED "$OUT_DIR"/estimate_*.txt
python3 bench/train_table.py "$OUT_DIR" | tee "$OUT_DIR/table.md"
echo "results in $OUT_DIR ($(left)s of the budget left)"
