#!/usr/bin/env bash
# Build llmtrain's release artifacts: an sdist, then a Linux wheel compiled from that sdist.
#
# The Docker builder stage runs this script; CI runs the same script outside Docker
# (docker/ci_check.sh), so the image's build step is tested without a Docker engine.
# Building from the sdist (the default) proves the sdist is complete and never touches the
# repository's build/ folder (the editable install's CMake cache).
#
# Environment knobs (all optional):
#   PYTHON               interpreter that runs `python -m build` (default: python3); `build` is
#                        installed into it when missing
#   LLMTRAIN_DIST_DIR    output folder for the sdist and the wheel (default: dist)
#   LLMTRAIN_CUDA        AUTO (default: CUDA kernels when nvcc is found) | ON (no nvcc = error) | OFF
#   LLMTRAIN_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default "80;90;120": Ampere, Hopper, Blackwell
#                        RTX 50xx; each gets SASS + PTX, so newer GPUs JIT from the PTX)
#   LLMTRAIN_CUTLASS     nvidia-cutlass version to take CuTe headers from (e.g. 4.2.0.0); none: build
#                        without them; unset: CMake's default (an installed wheel, else the pinned
#                        headers fetched from PyPI). LLMTRAIN_CUTLASS_DIR (a folder with cute/tensor.hpp) wins.
#   LLMTRAIN_SDIST       1 (default): sdist + wheel from the sdist; 0: wheel only, from the tree
#   CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: number of cores)
#   CUDACXX              the nvcc to use when it is not on PATH (e.g. /usr/local/cuda/bin/nvcc)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
dist_dir=${LLMTRAIN_DIST_DIR:-dist}
case "$dist_dir" in /*) ;; *) dist_dir="$PWD/$dist_dir" ;; esac
export LLMTRAIN_CUDA=${LLMTRAIN_CUDA:-AUTO}
archs=${LLMTRAIN_CUDA_ARCHS:-80;90;120}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}

case "${LLMTRAIN_CUDA^^}" in
  AUTO|ON|OFF) ;;
  *) echo "build.sh: LLMTRAIN_CUDA must be AUTO, ON or OFF, got '$LLMTRAIN_CUDA'" >&2; exit 2 ;;
esac
if ! [[ "$archs" =~ ^[0-9]+[a-z]?(-real|-virtual)?(\;[0-9]+[a-z]?(-real|-virtual)?)*$ ]]; then
  echo "build.sh: LLMTRAIN_CUDA_ARCHS must be CMake CUDA architectures like '80;90;120', got '$archs'" >&2
  exit 2
fi
if [ "${LLMTRAIN_CUDA^^}" != OFF ] && ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDACXX:-}" ] \
   && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc   # the CUDA images keep nvcc off PATH
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! "$PYTHON" -c "import build" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet "build>=1.2"
fi

config=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$archs")
cutlass_dir=${LLMTRAIN_CUTLASS_DIR:-}
if [ -z "$cutlass_dir" ] && [ -n "${LLMTRAIN_CUTLASS:-}" ] && [ "${LLMTRAIN_CUTLASS}" != none ]; then
  "$PYTHON" -m pip install --quiet --no-deps --target "$tmp/cutlass" "nvidia-cutlass==$LLMTRAIN_CUTLASS"
  cutlass_dir="$tmp/cutlass/cutlass_library/source/include"
fi
if [ -n "$cutlass_dir" ]; then
  [ -f "$cutlass_dir/cute/tensor.hpp" ] || { echo "build.sh: no cute/tensor.hpp under $cutlass_dir" >&2; exit 2; }
  config+=(-C "cmake.define.LLMTRAIN_CUTLASS_DIR=$cutlass_dir")
elif [ "${LLMTRAIN_CUTLASS:-}" = none ]; then
  config+=(-C "cmake.define.LLMTRAIN_CUTLASS_DIR=")  # explicitly without (else CMake fetches them)
fi

mkdir -p "$dist_dir"
echo "== build.sh: LLMTRAIN_CUDA=$LLMTRAIN_CUDA archs=$archs cutlass=${cutlass_dir:-none}" \
     "jobs=$CMAKE_BUILD_PARALLEL_LEVEL -> $dist_dir"
start=$(date +%s)
if [ "${LLMTRAIN_SDIST:-1}" = 1 ]; then
  "$PYTHON" -m build --outdir "$dist_dir" "${config[@]}" "$repo"
else
  "$PYTHON" -m build --wheel --outdir "$dist_dir" "${config[@]}" -C "build-dir=$tmp/build" "$repo"
fi
echo "== build.sh: built in $(( $(date +%s) - start )) s:"
ls -l "$dist_dir"
