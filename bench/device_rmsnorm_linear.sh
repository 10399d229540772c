#!/usr/bin/env bash
# CUDA RMSNorm+Linear on the GPU machine: tests (v2 default path and the opt-in v3 path,
# LLMTRAIN_RMSLIN=v3, then the SIMT path), a kernel breakdown, and the benchmark table
# (ours v2 / v3 vs eager, torch.compile, Liger, bare GEMM; forward and forward+backward).
# Usage (repo root): [SKIP_BUILD=1] [BUDGET_S=80] [RMS_PLAN=verify|parts] [RMS_IMPLS=a,b] [RMS_SHAPES=0,1]
#   [RMS_TESTS=0] [RMS_PARTS_ARGS="--graph --rounds 8"] bash bench/device_rmsnorm_linear.sh
#   RMS_PLAN=verify: tests, micro, table. RMS_PLAN=parts: tests, then bench/rmsnorm_linear_parts.py (the
#   2048 shape's forward+backward taken apart: per-iteration times, per-kernel durations, allocator
#   counters; RMS_PARTS_ARGS are passed on) with GPU clocks sampled beside it (parts.md, parts.json,
#   parts_clocks.csv); no micro (RMS_MICRO=1 adds it), no table. RMS_TESTS=0 skips the tests.
#   SKIP_BUILD=1: llmtrain and the wheels are already installed (the lead's wrapper); otherwise the
#   carried .whl/ wheels are installed and llmtrain is built for sm_90a first (not counted in BUDGET_S).
# Results: $OUT/rmsnorm_linear/ (tests.txt, micro.txt, tests_v3.txt, tests_portable.txt, table.md,
# table.json, profile.txt). Every step runs under `timeout` within BUDGET_S, most important first.
set -uo pipefail
OUT=${OUT:-$PWD/out}
R="$OUT/rmsnorm_linear"
mkdir -p "$R"
BUDGET_S=${BUDGET_S:-80}
PLAN=${RMS_PLAN:-full}
case $PLAN in
  full|verify|parts) ;;
  *) echo "unknown RMS_PLAN '$PLAN' (full, verify, parts)"; exit 2 ;;
esac
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$R/pip.log" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export TORCH_CUDA_ARCH_LIST=9.0a
  if ! python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a \
      -Cbuild.verbose=true >"$R/build.log" 2>&1; then
    tail -60 "$R/build.log"; echo "BUILD FAILED"; exit 1
  fi
fi
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
# step NAME MAX_S CMD...: run under timeout min(MAX_S, budget left - 2); skipped when < 5 s remain.
step() {
  local name=$1 max=$2; shift 2
  local l; l=$(left); l=$(( l - 2 ))
  (( l < max )) && max=$l
  if (( max < 5 )); then echo "## $name: skipped (budget)"; return; fi
  echo "## $name (limit ${max}s)"
  timeout -k 3 "$max" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "## $name: TIMED OUT after ${max}s"
  return 0
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1
PYT="python3 -m pytest -q -p no:cacheprovider tests/cuda/test_rmsnorm_linear_cuda.py"
# 1. Correctness: every test (v2 default + v3 and the switches via their own tests).
[ "${RMS_TESTS:-1}" = 1 ] && step tests "${RMS_TESTS_S:-90}" bash -c "$PYT 2>&1 | tail -${RMS_TESTS_TAIL:-25} | tee '$R/tests.txt'"
# 1b. Row-kernel micro-benchmark (session 8): the pre-pass and the backward row pass alone, s7 vs s8,
#     against a device-to-device copy, bit-for-bit checks between the two (standalone nvcc build,
#     no torch). RMS_MICRO=0 skips it. Results: micro.txt.
if [ "${RMS_MICRO:-$([ "$PLAN" = parts ] && echo 0 || echo 1)}" = 1 ]; then
  step micro 60 bash -c "nvcc -std=c++17 -O3 -arch=sm_90a -I csrc bench/rmsnorm_rows_micro.cu -o /tmp/rms_rows_micro \
    && /tmp/rms_rows_micro 2>&1 | tee '$R/micro.txt'"
fi
# 2. Whole suite with v3 selected for every test, and the SIMT path, if time remains.
[ "$PLAN" = full ] && step tests_v3 30 bash -c "LLMTRAIN_RMSLIN=v3 $PYT -x 2>&1 | tail -5 | tee '$R/tests_v3.txt'"
[ "$PLAN" = full ] && step tests_portable 30 bash -c "LLMTRAIN_RMSLIN_PORTABLE=1 $PYT -x 2>&1 | tail -5 | tee '$R/tests_portable.txt'"
# 3. Kernel breakdown at 16384x2048->2048 (torch profiler): the default, session 7's row kernels
#    (LLMTRAIN_RMSLIN_ROWS=s7), the row pass's L2 prefetch, and v2. A profiled run serializes differently from do_bench: compare the sum
#    of kernel times with the table's wall times for the launch gaps.
#    RMS_PROFILE=1 runs it under the verify plan too (session 11: the native data GEMM).
[ "$PLAN" = full ] || [ "${RMS_PROFILE:-0}" = 1 ] && step profile 30 python3 - <<'PY' 2>&1 | tee "$R/profile.txt"
import os, sys, torch
sys.path.insert(0, "bench")
from rmsnorm_linear_table import inputs, make_impls, fwd_fn, fwd_bwd_fn
impls = make_impls()
x, g, w, dy = inputs(16384, 2048, 2048)
for label_env, env in (("default", {}), ("v6", {"LLMTRAIN_RMSLIN_FWD": "v6"}),
                       ("native_dgrad", {"LLMTRAIN_RMSLIN_DGRAD": "native"}), ("v2", {"LLMTRAIN_RMSLIN": "v2"})):
    for key in [k for k in os.environ if k.startswith("LLMTRAIN_RMSLIN")]:
        os.environ.pop(key)
    os.environ.update(env)
    for label, fn in (("fwd", fwd_fn(impls["ours"], x, g, w)), ("fwd+bwd", fwd_bwd_fn(impls["ours"], x, g, w, dy))):
        for _ in range(3): fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10): fn()
            torch.cuda.synchronize()
        print(f"== ours {label_env} {label} (us per iteration)")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
            print(f"  {e.device_time_total/10:9.1f}  x{e.count//10:<3d} {e.key[:110]}")
PY
# 4. The table at 2048 (the two targets), then 5632 and 8192; rows print as they finish.
#    RMS_IMPLS=ours,ours_pdl,ours_sepred,compiled / RMS_SHAPES=0: a subset (eager always measured).
[ "$PLAN" = parts ] || step table 90 bash -c "python3 bench/rmsnorm_linear_table.py ${RMS_IMPLS:+--impls $RMS_IMPLS} ${RMS_SHAPES:+--shapes $RMS_SHAPES} --json '$R/table.json' 2>'$R/table.err' | tee '$R/table.md'"
[ "$PLAN" = parts ] || tail -3 "$R/table.err" 2>/dev/null
# 5. RMS_PLAN=parts (session 10): why the 2048 shape's forward+backward is bimodal across do_bench rounds
#    (docs/perf.md, session 8). The script stops starting rounds 10 s before the step's limit and then
#    prints its tables; it writes parts.json after every round. GPU clocks / power every 200 ms beside it
#    (its round lines carry the wall-clock times to match them with).
if [ "$PLAN" = parts ]; then
  lim=$(( $(left) - 2 )); (( lim > 300 )) && lim=300
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 200 \
    >"$R/parts_clocks.csv" 2>/dev/null &
  smi_pid=$!
  step parts 300 bash -c "python3 bench/rmsnorm_linear_parts.py --max-s $(( lim > 11 ? lim - 10 : 1 )) ${RMS_PARTS_ARGS:-} \
    --json '$R/parts.json' 2>'$R/parts.err' | tee '$R/parts.md'"
  kill "$smi_pid" 2>/dev/null
  tail -3 "$R/parts.err" 2>/dev/null
fi
echo "rmsnorm_linear: $(( $(date +%s) - T0 )) s of ${BUDGET_S} s"
