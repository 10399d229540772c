#!/usr/bin/env bash
# One device call for the CUDA power retention: tests and the benchmark table, v1, v2 and v3 kernels
# (LLMTRAIN_RETENTION_KERNEL) side by side. Usage (repo root, on the GPU machine):
#   BUDGET_S=220 SKIP_BUILD=1 bash bench/device_retention.sh
# SKIP_BUILD=1: llmtrain and the carried wheels are already installed (the lead's wrapper); else the
# wheels in .whl/ are installed to /tmp/site and llmtrain is built for sm_90a first.
# Within BUDGET_S seconds (hard stops through `timeout`), most important first:
#   1. tests/cuda/test_power_retention_cuda.py with v3 (the whole grid: v3 runs v2's kernels and reads
#      the forward's kept states; includes v3 == v2 bitwise), then a v2 subset (+ worst rel err per tensor)
#   2. table, d = 64, forward+backward then forward: ours-v1/v2/v3, SDPA causal, FLA (fwd)
#   2b. per-kernel profile of v2 and v3 forward+backward at t = 2K and 64K
#   2c. decode step latency, v1 vs v3 (table_decode.md)
#   3. a short v1 test subset (v1 was verified on the whole grid before)
#   4. d = 128 (same impls), then retention 1.0.7 c1024 forward+backward (slow Triton autotune)
# PR_PLAN=verify instead: the default generation's tests and d = 64 row. PR_PLAN=next [PR_NEXT="v7 v8"]: candidate
# generations' tests (whole grid each), their d = 64 tables beside the default, and the profiles. PR_PLAN=chunks: the chunk-size sweep of v3 (c256/512/1024, d = 64 and 128) and the anchor.
# Results under $OUT/retention/ (or ./out/retention): tests_v3.txt, tests_v2.txt, errors_v[23]*.txt,
# table_d64_fwdbwd.md, profile.md,
# table_d64_fwd.md,
# tests_v1.txt, table_d128.md, table_retention.md, plus .json / .err files.
set -uo pipefail
OUT_DIR=${OUT:-$PWD/out}/retention
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
T_END=$(( $(date +%s) + ${BUDGET_S:-220} ))
left() { echo $(( T_END - $(date +%s) )); }
# timeout for a step: min(cap, time left - reserve), at least 1
cap() { local l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT_DIR/pip.log" 2>&1 || { tail -5 "$OUT_DIR/pip.log"; echo "WHEELS FAILED"; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  t0=$(date +%s)
  if ! python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a \
      -Cbuild.verbose=true -Cbuild-dir=/tmp/llmtrain-build >"$OUT_DIR/build.log" 2>&1; then
    grep -E "error" "$OUT_DIR/build.log" | head -30; tail -30 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
  fi
  echo "build: $(( $(date +%s) - t0 )) s"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

summary() {  # worst relative error per tensor from an errors.jsonl
  python3 - "$1" <<'PY'
import json, sys, collections
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    sys.exit(0)
worst, where = collections.defaultdict(float), {}
for r in rows:
    if r["rel_err"] >= worst[r["tensor"]]:
        worst[r["tensor"]], where[r["tensor"]] = r["rel_err"], r["case"]
for k, v in worst.items():
    print(f"  {k:12s} {v:.2e}  ({where[k]})")
PY
}

run_tests() {  # version, timeout, extra pytest args...
  local ver=$1 to=$2; shift 2
  local t0=$(date +%s)
  echo "== tests $ver (timeout ${to}s)"
  local env_ver=$ver; [ "$ver" = default ] && env_ver=
  LLMTRAIN_RETENTION_KERNEL=$env_ver PR_ERRLOG="$OUT_DIR/errors_$ver.jsonl" timeout "$to" python3 -m pytest -q \
    -p no:cacheprovider tests/cuda/test_power_retention_cuda.py "$@" 2>&1 | tail -40 | tee "$OUT_DIR/tests_$ver.txt"
  echo "tests $ver: $(( $(date +%s) - t0 )) s; worst rel err per tensor:"
  summary "$OUT_DIR/errors_$ver.jsonl" | tee "$OUT_DIR/errors_${ver}_summary.txt"
}

table() {  # name, timeout, args...
  local name=$1 to=$2; shift 2
  echo "== table $name (timeout ${to}s)"
  local nd=--no-decode; [ "$name" = decode ] && nd=
  timeout "$to" python3 bench/power_retention_table.py $nd --json "$OUT_DIR/table_$name.json" "$@" \
    2>"$OUT_DIR/table_$name.err" | tee "$OUT_DIR/table_$name.md"
  tail -3 "$OUT_DIR/table_$name.err"
}

if [ "${PR_PLAN:-full}" = verify ]; then
  # The build's default generation (no LLMTRAIN_RETENTION_KERNEL) on the whole grid, then its table row.
  run_tests default "$(cap 60 30)"
  [ "$(left)" -gt 20 ] && table default_d64 "$(cap 40 5)" --d 64 --only ours,sdpa-causal
  echo "done, $(left) s of the budget left"
  exit 0
fi
if [ "${PR_PLAN:-full}" = next ]; then
  # A candidate generation (PR_NEXT; v4 when unset) against the build's default: the whole grid (with
  # its bitwise test against v3), the d = 64 table side by side, then the per-kernel profile.
  # PR_NEXT may name several candidates ("v7 v8"): each on the whole grid, then one table for all.
  read -r -a nxt <<<"${PR_NEXT:-v4}"
  only=ours
  for v in "${nxt[@]}"; do
    run_tests "$v" "$(cap 120 60)"
    only=$only,ours-$v
  done
  # PR_EXTRA: more rows for the tables (e.g. ours-v7-single,ours-v7-c256); PR_T: their t values
  # (default 2K 8K 32K 64K); PR_D128=1: a d = 128 forward+backward table of the same rows too.
  only=$only${PR_EXTRA:+,$PR_EXTRA}
  # shellcheck disable=SC2086
  tflag=${PR_T:+--t $PR_T}
  # shellcheck disable=SC2086
  [ "$(left)" -gt 20 ] && table next_d64_fwdbwd "$(cap 60 15)" --d 64 --no-fwd --only "$only",sdpa-causal $tflag
  # shellcheck disable=SC2086
  [ "$(left)" -gt 15 ] && table next_d64_fwd "$(cap 40 10)" --d 64 --no-bwd --only "$only",sdpa-causal $tflag
  # shellcheck disable=SC2086
  [ "${PR_D128:-0}" = 1 ] && [ "$(left)" -gt 45 ] && table next_d128_fwdbwd "$(cap 60 30)" --d 128 --no-fwd \
    --only "$only",sdpa-causal $tflag
  [ "$(left)" -gt 30 ] && timeout "$(cap 40 5)" python3 bench/power_retention_profile.py \
    --d 64 --t 2048 65536 --kernels "${PR_PROFILE_BASE:-v3}" "${nxt[@]}" 2>&1 | tee "$OUT_DIR/profile.md"
  echo "done, $(left) s of the budget left"
  exit 0
fi
if [ "${PR_PLAN:-full}" = chunks ]; then
  # Chunk-size sweep of the default generation (picks default_chunk_size per d), then the anchor.
  sweep=ours-v3-c256,ours-v3-c512,ours-v3-c1024
  [ "$(left)" -gt 20 ] && table chunks_d64_fwdbwd "$(cap 45 10)" --d 64 --no-fwd --only $sweep,sdpa-causal
  [ "$(left)" -gt 20 ] && table chunks_d64_fwd "$(cap 30 10)" --d 64 --no-bwd --only $sweep,fla-simple-gla
  [ "$(left)" -gt 30 ] && table chunks_d128 "$(cap 60 10)" --d 128 --only $sweep
  [ "$(left)" -gt 40 ] && table retention "$(cap 120 5)" --d 64 --t 2048 65536 --no-fwd --only retention-c1024
  echo "done, $(left) s of the budget left"
  exit 0
fi
# 1. v3 correctness on the whole grid, then the v2 paths v3 does not take (gradient of the final
#    state with gating recomputes the states) and the v1/v2/v3 agreement (leave >= 90 s for the tables)
run_tests v3 "$(cap ${PR_TEST_TIMEOUT:-100} 110)"
[ "$(left)" -gt 100 ] && run_tests v2 "$(cap 30 90)" -k "dS or agree or v3 or bit_identical"
# 2. d = 64: forward+backward first (the target), then forward; v1 vs v2 with the anchors of the
#    same run (FLA's gated backward refuses Hopper with this Triton, so FLA is forward only)
[ "$(left)" -gt 20 ] && table d64_fwdbwd "$(cap 80 35)" --d 64 --no-fwd --only ours-v1,ours-v2,ours-v3,sdpa-causal
[ "$(left)" -gt 15 ] && table d64_fwd "$(cap 60 5)" --d 64 --no-bwd --only ours-v1,ours-v2,sdpa-causal,fla-simple-gla
# 2b. per-kernel breakdown of v2 and v3 forward+backward (where the next version's time must come from)
[ "$(left)" -gt 45 ] && timeout "$(cap 40 15)" python3 bench/power_retention_profile.py \
  --d 64 --t 2048 65536 --kernels v2 v3 2>&1 | tee "$OUT_DIR/profile.md"
# 2c. decode step, v1 vs v3 (d = 64 and 128, batch 1 and 64; a few seconds)
[ "$(left)" -gt 30 ] && table decode "$(cap 25 5)" --d 64 128 --no-fwd --no-bwd --decode-kernels v1,v3
# 3. short v1 subset
[ "$(left)" -gt 40 ] && run_tests v1 "$(cap 60 5)" -k "t3000 or bit_identical or public_op or agree"
# 4. d = 128, then retention 1.0.7 c1024 forward+backward
[ "$(left)" -gt 40 ] && table d128 "$(cap 90 5)" --d 128 --only ours-v1,ours-v2,ours-v3,sdpa-causal,fla-simple-gla
[ "$(left)" -gt 60 ] && table retention "$(cap 150 5)" --d 64 --no-fwd --only retention-c1024
echo "done, $(left) s of the budget left"
