# Two commands: `make test` and `make bench`. Each creates .venv if missing and installs
# what it needs into it; re-running installs nothing new (the stamp tracks pyproject.toml).
VENV    ?= .venv
PY      := $(VENV)/bin/python
# On the CPU-only machines this project is developed on, torch==2.13.0 is the CPU build on disk.
# On a CUDA machine pass e.g. TORCH=torch (or install torch into .venv first: an installed torch is kept).
TORCH   ?= torch==2.13.0
# Triton's interpreter runs the kernels on the CPU; 3.8 works with numpy 2.x.
TRITON  ?= triton==3.8.0
PYTEST_ARGS ?=
# The C++ extension lora_kernels._C (csrc/) is built by the editable install: CPU-only with the CPU torch,
# CUDA with a CUDA torch and nvcc. LORA_KERNELS_NO_EXT=1 skips it. Editing csrc/ rebuilds it on the next run.
NATIVE_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test bench install clean build-cuda

$(VENV)/.stamp: pyproject.toml setup.py $(NATIVE_SRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	LORA_KERNELS_NO_EXT=$${LORA_KERNELS_NO_EXT:-0} MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(VENV)/.stamp

test: $(VENV)/.stamp
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

bench: $(VENV)/.stamp
	$(PY) -m bench

# Builds lora_kernels._C as a CUDA extension (sm_80 + sm_90) against the CUDA torch in .venv-cuda, on a
# machine with nvcc and no GPU, loads it and checks every native op has a CUDA kernel (scripts/build_cuda_check.sh).
build-cuda:
	scripts/build_cuda_check.sh

clean:
	rm -rf $(VENV) .venv-cuda build *.egg-info bench/out lora_kernels/_C*.so
