#!/usr/bin/env bash
# Install llmtrain and its runtime into the current Python environment (a venv), step by step.
#
#   docker/install.sh [STEP...]        default steps: torch deepspeed extras llmtrain check
#
#   validate   check the knobs only (TORCH_CUDA_ARCH_LIST in a form DeepSpeed parses, ...)
#   torch      PyTorch TORCH_VERSION (from TORCH_INDEX_URL when set, e.g. the CUDA 12.8 index)
#   deepspeed  DeepSpeed DEEPSPEED_VERSION with its CPU-Adam op compiled now (DS_BUILD_CPU_ADAM=1),
#              so the first ZeRO-Offload run does not JIT-compile it
#   extras     tensorboard, matplotlib (loss curves), ninja, transformers, datasets
#   llmtrain   the llmtrain wheel from LLMTRAIN_WHEEL_DIR (no index lookup for llmtrain itself)
#   check      import everything, print `llmtrain info`, assert the prebuilt CPU-Adam op is usable
#
# The Docker builder stage runs `torch deepspeed extras` before it copies the sources (a cached
# layer), then `llmtrain check` after docker/build.sh. CI runs the same steps in a fresh venv.
#
# Environment knobs (all optional):
#   PYTHON                 the environment's interpreter (default: python3, i.e. the active venv)
#   TORCH_VERSION          default 2.13.0; "none" keeps the installed torch
#   TORCH_INDEX_URL        PyTorch index to take torch from (default: pip's configured indexes)
#   DEEPSPEED_VERSION      default 0.19.8; "none" skips DeepSpeed
#   DS_BUILD_CPU_ADAM      1 (default) prebuilds the CPU-Adam op; 0 leaves it to DeepSpeed's JIT
#   DS_BUILD_OPS           0 (default): every other op stays JIT (fused Adam etc. need nvcc then)
#   DS_ACCELERATOR         the accelerator the ops are built for; DeepSpeed loads a prebuilt op only
#                          when this matches the one it detects at run time. Building in Docker has
#                          no GPU, so the Dockerfile sets cuda. Default: DeepSpeed's auto-detection.
#   TORCH_CUDA_ARCH_LIST   for DeepSpeed's CUDA ops, default "8.0;9.0;12.0". DeepSpeed parses each
#                          entry as MAJOR.MINOR[+PTX]: "9.0a"/"10.0a"/"sm_90" make it fail.
#   DS_CPU_ARCH            -march for the CPU-Adam op: "native" (DeepSpeed's own choice: the build
#                          machine's CPU, AVX-512 when it has it) or a portable level such as
#                          x86-64-v3 (AVX2; what the Dockerfile uses so the image runs on any
#                          Haswell/Zen or newer CPU). Default: native.
#   EXTRA_PACKAGES         default "tensorboard>=2.16 matplotlib>=3.8 ninja transformers>=5.0 datasets>=2.19"
#   LLMTRAIN_WHEEL_DIR     folder holding llmtrain-*.whl (default: dist)
#   LLMTRAIN_EXPECT_BACKENDS  backends `check` requires in llmtrain._C (default: cpu), e.g. "cpu cuda"
set -euo pipefail

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0;12.0}
DS_CPU_ARCH=${DS_CPU_ARCH:-native}
EXTRA_PACKAGES=${EXTRA_PACKAGES:-tensorboard>=2.16 matplotlib>=3.8 ninja transformers>=5.0 datasets>=2.19}
LLMTRAIN_WHEEL_DIR=${LLMTRAIN_WHEEL_DIR:-dist}
LLMTRAIN_EXPECT_BACKENDS=${LLMTRAIN_EXPECT_BACKENDS:-cpu}

pip_install() { "$PYTHON" -m pip install --no-input "$@"; }
log() { echo "== install.sh: $*"; }

validate() {
  # DeepSpeed's op builder splits each entry on '.' and int()s both parts (only a "+PTX" suffix is
  # understood); PyTorch's own arch-specific forms such as 9.0a or 10.0f make it raise
  # "invalid literal for int()" in the middle of a build or of the first training step.
  local entry
  for entry in ${TORCH_CUDA_ARCH_LIST//;/ }; do
    if ! [[ "$entry" =~ ^[0-9]+\.[0-9]+(\+PTX)?$ ]]; then
      echo "install.sh: TORCH_CUDA_ARCH_LIST entry '$entry' is not MAJOR.MINOR[+PTX]; DeepSpeed cannot" \
           "parse it (9.0a, 10.0a, sm_90 are PyTorch/nvcc spellings). Use e.g. \"8.0;9.0;12.0\"." >&2
      return 2
    fi
  done
  if ! [[ "$DS_CPU_ARCH" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "install.sh: DS_CPU_ARCH must be a gcc -march value (native, x86-64-v3, ...), got '$DS_CPU_ARCH'" >&2
    return 2
  fi
}

step_torch() {
  if [ "$TORCH_VERSION" = none ]; then log "torch: keeping $("$PYTHON" -c 'import torch; print(torch.__version__)')"; return; fi
  log "torch==$TORCH_VERSION ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
  if [ -n "$TORCH_INDEX_URL" ]; then
    pip_install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    pip_install "torch==$TORCH_VERSION"
  fi
}

# DeepSpeed compiles the CPU-Adam op with -march=native and picks AVX-512/AVX2 from the build
# machine's CPU. For a portable binary, compile through wrappers that substitute DS_CPU_ARCH.
cpu_arch_wrappers() {
  local dir=$1 simd
  case "$DS_CPU_ARCH" in
    x86-64-v4|*avx512*|sapphirerapids|icelake*|skylake-avx512|znver4|znver5) simd=__AVX512__ ;;
    x86-64-v3|haswell|broadwell|skylake|alderlake|znver1|znver2|znver3) simd=__AVX256__ ;;
    *) simd=__SCALAR__ ;;
  esac
  local name real
  for name in gcc g++; do
    real=$(command -v "$name") || { echo "install.sh: DS_CPU_ARCH needs $name on PATH" >&2; return 1; }
    cat >"$dir/$name" <<EOF
#!/usr/bin/env bash
# DS_CPU_ARCH=$DS_CPU_ARCH: -march=native -> -march=$DS_CPU_ARCH, SIMD macro -> -D$simd
args=()
for a in "\$@"; do
  case "\$a" in
    -march=native) args+=("-march=$DS_CPU_ARCH") ;;
    -D__AVX512__|-D__AVX256__|-D__SCALAR__) args+=("-D$simd") ;;
    *) args+=("\$a") ;;
  esac
done
exec "$real" "\${args[@]}"
EOF
    chmod +x "$dir/$name"
  done
  export CC="$dir/gcc" CXX="$dir/g++"
}

step_deepspeed() {
  if [ "$DEEPSPEED_VERSION" = none ]; then log "deepspeed: skipped"; return; fi
  local tmp
  tmp=$(mktemp -d)
  # DeepSpeed's setup.py imports torch and its op builders: build it against the installed torch.
  pip_install "setuptools>=69" wheel py-cpuinfo ninja
  export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
  export DS_BUILD_CPU_ADAM=${DS_BUILD_CPU_ADAM:-1}
  if [ "$DS_CPU_ARCH" != native ]; then cpu_arch_wrappers "$tmp"; fi
  log "deepspeed==$DEEPSPEED_VERSION DS_BUILD_OPS=$DS_BUILD_OPS DS_BUILD_CPU_ADAM=$DS_BUILD_CPU_ADAM" \
      "DS_ACCELERATOR=${DS_ACCELERATOR:-auto} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST DS_CPU_ARCH=$DS_CPU_ARCH"
  # --no-binary: DeepSpeed's ops are compiled only when it is built from source (it ships an sdist).
  pip_install --no-build-isolation --no-cache-dir --no-binary deepspeed "deepspeed==$DEEPSPEED_VERSION"
  rm -rf "$tmp"
  unset CC CXX
}

step_extras() {
  log "extras: $EXTRA_PACKAGES"
  # shellcheck disable=SC2086  # a list of requirement specifiers
  pip_install $EXTRA_PACKAGES
}

step_llmtrain() {
  local wheels=("$LLMTRAIN_WHEEL_DIR"/llmtrain-*.whl)
  [ -f "${wheels[0]}" ] || { echo "install.sh: no llmtrain-*.whl in $LLMTRAIN_WHEEL_DIR (run docker/build.sh)" >&2; return 1; }
  [ "${#wheels[@]}" = 1 ] || { echo "install.sh: several wheels in $LLMTRAIN_WHEEL_DIR: ${wheels[*]}" >&2; return 1; }
  log "llmtrain: ${wheels[0]}"
  pip_install "${wheels[0]}"
}

step_check() {
  log "check (expect backends: $LLMTRAIN_EXPECT_BACKENDS)"
  (cd / && llmtrain info)  # from / so the import is the installed package, not a source tree
  (cd / && LLMTRAIN_EXPECT_BACKENDS="$LLMTRAIN_EXPECT_BACKENDS" DEEPSPEED_VERSION="$DEEPSPEED_VERSION" \
     "$PYTHON" - <<'EOF'
import importlib, os
from llmtrain.ops._native import build_info
from llmtrain.training.config import configs_dir, resolve_config_path

info = build_info()
for backend in os.environ["LLMTRAIN_EXPECT_BACKENDS"].split():
    assert backend in info["backends"], f"llmtrain._C lacks the {backend} backend: {info}"
for preset in ("quick_start", "pretrain_5080"):
    resolve_config_path(preset)
assert (configs_dir() / "ds_config.json").is_file(), f"no ds_config.json in {configs_dir()}"
print(f"llmtrain._C backends {info['backends']}; presets in {configs_dir()}")
if os.environ["DEEPSPEED_VERSION"] != "none":
    from deepspeed.git_version_info import accelerator_name, installed_ops
    assert installed_ops.get("cpu_adam"), f"DeepSpeed CPU-Adam was not prebuilt: {installed_ops}"
    # DeepSpeed uses a prebuilt op only when the accelerator it detects at run time is this one
    want = os.environ.get("DS_ACCELERATOR")
    assert not want or accelerator_name == want, f"ops built for {accelerator_name!r}, not {want!r}"
    importlib.import_module("deepspeed.ops.adam.cpu_adam_op")  # the prebuilt extension itself
    print(f"deepspeed: cpu_adam prebuilt for accelerator {accelerator_name!r}")
EOF
  )
}

validate
steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(torch deepspeed extras llmtrain check)
for step in "${steps[@]}"; do
  case "$step" in
    validate) ;;
    torch|deepspeed|extras|llmtrain|check) "step_$step" ;;
    *) echo "install.sh: unknown step '$step' (validate torch deepspeed extras llmtrain check)" >&2; exit 2 ;;
  esac
done
