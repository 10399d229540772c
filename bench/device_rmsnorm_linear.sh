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
python3 bench/rmsnorm_linear_table.py --json "$OUT/table.json" 2>"$OUT/table.err" | tee "$OUT/table.md"
tail -5 "$OUT/table.err"
