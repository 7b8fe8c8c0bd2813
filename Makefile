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

.PHONY: test bench install clean

$(VENV)/.stamp: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	LORA_KERNELS_NO_EXT=$${LORA_KERNELS_NO_EXT:-1} $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

install: $(VENV)/.stamp

test: $(VENV)/.stamp
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

bench: $(VENV)/.stamp
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info bench/out
