#!/usr/bin/env bash
# One device call for everything GPU-side: install the carried wheels, build llmtrain once for the
# device's arch, then run each area's device script with its own time budget, most important first.
# Usage (repo root, on the GPU machine): bash bench/device_session.sh [area ...]
#   areas: retention rmsnorm_linear train ncu (default: the first three, in that order)
# Budgets (seconds) come from RETENTION_S, RMSNORM_LINEAR_S, TRAIN_S, NCU_S. Results: $OUT/results.tar.gz
# (<area>/ folders inside).
set -uo pipefail
# The device tool brings back at most 8 files from $OUT, so every area writes under $RESULTS and the
# whole tree comes back as one tarball, refreshed after each step (a later kill loses nothing earlier).
FINAL_OUT=${OUT:-$PWD/out}
RESULTS=${RESULTS:-/tmp/llmtrain-results}
mkdir -p "$FINAL_OUT" "$RESULTS"
OUT=$RESULTS
pack() { tar czf "$FINAL_OUT/results.tar.gz" -C "$RESULTS" . 2>/dev/null; }
export OUT PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed cannot parse the image's "9.0a"
start=$(date +%s)
# SKIP_BUILD=1: a warm machine that an earlier call of this script set up (wheels in /tmp/site,
# llmtrain installed): run the areas only.
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; echo "WHEELS FAILED (continuing without them)"; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}a' if m == 9 else f'{m}{n}')")
if [ "${SKIP_BUILD:-0}" != 1 ] && ! python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" \
    -Cbuild.verbose=true -Cbuild-dir=/tmp/llmtrain-build >"$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"; echo "BUILD FAILED"; pack; exit 1
fi
echo "build (sm_$arch): $(( $(date +%s) - start )) s since start"
grep -E "spill" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | sort | uniq -c | head -10 || true
(cd /tmp && python3 -c "import llmtrain._C as C; print(C.build_info())") | tee "$OUT/build_info.txt"
grep -q "'cutlass': True" "$OUT/build_info.txt" || echo "WARNING: built without CuTe/CUTLASS headers (carry .whl with nvidia-cutlass): RMSNorm+Linear GEMMs run on the SIMT fallback"
pack
export SKIP_BUILD=1
areas=("$@"); [ ${#areas[@]} -eq 0 ] && areas=(retention rmsnorm_linear train)
for area in "${areas[@]}"; do
  case $area in
    retention) budget=${RETENTION_S:-220} ;;
    rmsnorm_linear) budget=${RMSNORM_LINEAR_S:-80} ;;
    train) budget=${TRAIN_S:-150} ;;
    ncu) budget=${NCU_S:-240} ;;
    *) echo "unknown area '$area' (retention, rmsnorm_linear, train, ncu)"; exit 2 ;;
  esac
  echo "=== $area (budget ${budget} s, $(( $(date +%s) - start )) s since start)"
  mkdir -p "$OUT/$area"
  BUDGET_S=$budget timeout --kill-after=10 $(( budget + 15 )) bash "bench/device_$area.sh" 2>&1 | tee "$OUT/$area/console.txt" | tail -60
  pack
done
echo "total: $(( $(date +%s) - start )) s"
