#!/usr/bin/env bash
# CUDA build check for machines with nvcc but no GPU (`make build-cuda`, CI):
#   1. a separate venv ($CUDA_VENV, default .venv-cuda) with the CUDA build of torch ($CUDA_TORCH),
#   2. build lora_kernels._C as a CUDA extension against it into build/cuda (not in-tree: the in-tree
#      lora_kernels/_C*.so is .venv's CPU build), for TORCH_CUDA_ARCH_LIST (default "8.0;9.0"),
#   3. load it and check that every native op has a CUDA kernel (scripts/check_native_build.py).
# Prints the time of each step. Environment: CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
CUDA_TORCH=${CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
PY=$CUDA_VENV/bin/python

t0=$(date +%s)
test -x "$PY" || python3 -m venv "$CUDA_VENV"
export PATH="$(cd "$CUDA_VENV" && pwd)/bin:$PATH"  # the venv's ninja
# Already-installed requirements make this a no-op of a few seconds.
"$PY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q "$CUDA_TORCH" ninja numpy 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch; assert torch.version.cuda, 'torch in $CUDA_VENV is not a CUDA build: ' + torch.__version__"
t1=$(date +%s)
echo "build-cuda: venv ready in $((t1 - t0)) s ($("$PY" -c 'import torch; print(torch.__version__)'))"

test -x "$CUDA_HOME/bin/nvcc" || { echo "build-cuda: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2; exit 1; }
# A clean build each time: ptxas only reports spills when it compiles, and CI starts clean anyway.
rm -rf build/cuda
mkdir -p build/cuda
# The full compiler log goes to build/cuda/build.log; its tail is shown on failure.
if ! LORA_KERNELS_REQUIRE_CUDA=1 "$PY" setup.py -q build_ext --build-lib build/cuda/lib --build-temp build/cuda/temp \
    > build/cuda/build.log 2>&1; then
  tail -n 60 build/cuda/build.log >&2
  echo "build-cuda: the CUDA build failed (full log: build/cuda/build.log)" >&2
  exit 1
fi
grep "lora_kernels setup.py" build/cuda/build.log || true
if grep -E "ptxas (warning|info).*(spill|[Ll]ocal memory|lmem)" build/cuda/build.log; then
  echo "build-cuda: a kernel spills registers or uses local memory (see above)" >&2
  exit 1
fi
t2=$(date +%s)
echo "build-cuda: extension built in $((t2 - t1)) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"

"$PY" scripts/check_native_build.py build/cuda/lib
echo "build-cuda: total $(($(date +%s) - t0)) s"
