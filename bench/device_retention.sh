#!/usr/bin/env bash
# One device call: install carried wheels, build llmtrain for Hopper, run the CUDA power retention
# tests and the benchmark table. Usage (repo root, on the GPU machine):
#   bash bench/device_retention.sh [tests|bench|all] [-- extra args for power_retention_table.py]
# Wheels carried in .whl/ (nvidia-cutlass for CuTe, retention 1.0.7, flash-linear-attention + fla-core)
# are installed first. Logs, errors and the table go to $OUT (or ./out).
set -uo pipefail
MODE=${1:-all}; shift || true
[ "${1:-}" = "--" ] && shift
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; echo "WHEELS FAILED"; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=9.0
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
    -Cbuild.verbose=true -Cbuild-dir=/tmp/llmtrain-build >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s; $(grep -o 'CuTe headers from.*' "$OUT/build.log" | head -1)"
grep -A2 -E "Compiling entry function '_ZN8llmtrain2pr" "$OUT/build.log" | grep -E "spill" | sort | uniq -c | head -5 || true
cd /tmp && python3 -c "import llmtrain._C as C; print(C.build_info())" && cd - >/dev/null
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  t0=$(date +%s)
  PR_ERRLOG="$OUT/errors.jsonl" timeout ${PR_TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
    tests/cuda/test_power_retention_cuda.py ${PR_TEST_ARGS:-} 2>&1 | tail -40 | tee "$OUT/tests.txt"
  echo "tests: $(( $(date +%s) - t0 )) s"
  python3 - "$OUT/errors.jsonl" <<'PY' | tee "$OUT/errors_summary.txt"
import json, sys, collections
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    sys.exit(0)
worst = collections.defaultdict(float)
for r in rows:
    worst[r["tensor"]] = max(worst[r["tensor"]], r["rel_err"])
print("worst rel err per tensor:", {k: f"{v:.2e}" for k, v in worst.items()})
PY
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  timeout ${PR_BENCH_TIMEOUT:-400} python3 bench/power_retention_table.py --json "$OUT/table.json" "$@" \
    2>"$OUT/table.err" | tee "$OUT/table.md"
  tail -5 "$OUT/table.err"
fi
