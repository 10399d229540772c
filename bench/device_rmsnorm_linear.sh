#!/usr/bin/env bash
# Build llmtrain for Hopper on the device machine, run the CUDA RMSNorm+Linear tests and the
# benchmark table. Usage (repo root, on the GPU machine): bash bench/device_rmsnorm_linear.sh
# Wheels carried in .whl/ (nvidia-cutlass for the CuTe headers, liger-kernel) are installed first.
# Logs and the table go to $OUT (or ./out when OUT is unset).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=9.0a
t0=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -q . -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90a \
    -Cbuild.verbose=true >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
grep -E "registers|spill|stack frame" "$OUT/build.log" | grep -i rmslin | head -20 || true
cd /tmp  # import the installed package, not the source tree
python3 -c "import llmtrain._C as C; print(C.build_info())"
cd - >/dev/null
python3 -m pytest -q tests/cuda/test_rmsnorm_linear_cuda.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.txt"
LLMTRAIN_RMSLIN_PORTABLE=1 python3 -m pytest -q -x tests/cuda/test_rmsnorm_linear_cuda.py -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/tests_portable.txt"
# Kernel breakdown (torch profiler) at 16384x2048->2048 and the alternative forward tile.
python3 - <<'PY' 2>&1 | tee "$OUT/profile.txt"
import os, sys, torch
sys.path.insert(0, "bench")
from rmsnorm_linear_table import inputs, make_impls, fwd_fn, fwd_bwd_fn, gemm_fn, measure
impls = make_impls()
x, g, w, dy = inputs(16384, 2048, 2048)
for name in ("ours", "eager"):
    for label, fn in (("fwd", fwd_fn(impls[name], x, g, w)), ("fwd+bwd", fwd_bwd_fn(impls[name], x, g, w, dy))):
        for _ in range(3): fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10): fn()
            torch.cuda.synchronize()
        print(f"== {name} {label} (10 iters, us total)")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            print(f"  {e.device_time_total/10:9.1f} us/iter  x{e.count//10:<3d} {e.key[:110]}")
os.environ["LLMTRAIN_RMSLIN_FWD_CFG"] = "1"
PY
LLMTRAIN_RMSLIN_FWD_CFG=1 python3 -c "
import sys; sys.path.insert(0, 'bench')
from rmsnorm_linear_table import *
impls = make_impls()
for n, k, m in SHAPES:
    x, g, w, dy = inputs(n, k, m)
    print(f'alt fwd tile 256x128: {n}x{k}->{m}: ours {measure(fwd_fn(impls[\"ours\"], x, g, w)):.3f} gemm {measure(gemm_fn(x, w)):.3f}')
" 2>&1 | tail -4 | tee -a "$OUT/profile.txt"
python3 bench/rmsnorm_linear_table.py --json "$OUT/table.json" 2>"$OUT/table.err" | tee "$OUT/table.md"
tail -5 "$OUT/table.err"
