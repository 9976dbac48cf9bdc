# Two commands do everything on a fresh machine:
#   make test    set up .venv if needed, build the extension, run the whole test suite
#   make bench   set up .venv if needed, run the operator, end-to-end, export and training benchmarks
#                (a small smoke grid on a CPU, the full grids on a GPU; results in benchmarks/results/)
#   make gpu-wheels   the Python 3.12 wheels the GPU test machine lacks, into ./wheels (see benchmarks/gpu_check.sh)
#   make test-gpu-torch   the suite on the CPU with the GPU machine's torch 2.11 / triton 3.6 (a copy of the tree in
#                build/gpu-torch, its own venv; about 10 minutes and 5 GB): run it before a GPU session
PYTHON_SYSTEM ?= python3
VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
CSRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

export HF_HUB_OFFLINE := 1
export MAX_JOBS ?= 2

.PHONY: setup test bench gpu-wheels test-gpu-torch clean

setup: $(VENV)/.ext

# Third-party packages, pinned (requirements.lock). Re-run only when the lock file changes.
$(VENV)/.deps: requirements.lock
	test -x $(PYTHON) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PIP) install -r requirements.lock
	touch $@

# The package in editable mode and its C++/CUDA extension, rebuilt when csrc/ or the build files change.
$(VENV)/.ext: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_ops.py
	$(PYTHON) benchmarks/bench_e2e.py
	$(PYTHON) benchmarks/bench_export.py
	$(PYTHON) benchmarks/bench_train.py

SHARED_WHEELS ?= ../shared/wheels/py312
gpu-wheels: $(VENV)/.deps
	mkdir -p wheels
	cp $(SHARED_WHEELS)/*.whl wheels/
	$(PIP) download --no-deps -d wheels onnxscript==0.7.2 onnx-ir==1.1.0

# The extension is built in place, so the suite runs on a copy of the tree (tracked and untracked, not ignored files).
GPU_TORCH_VENV := .venv-gpu-torch
GPU_TORCH_TREE := build/gpu-torch
test-gpu-torch:
	test -x $(GPU_TORCH_VENV)/bin/python || $(PYTHON_SYSTEM) -m venv $(GPU_TORCH_VENV)
	$(GPU_TORCH_VENV)/bin/pip -q --disable-pip-version-check install -r requirements-gpu-machine.lock
	rm -rf $(GPU_TORCH_TREE) && mkdir -p $(GPU_TORCH_TREE)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(GPU_TORCH_TREE)
	cd $(GPU_TORCH_TREE) && $(CURDIR)/$(GPU_TORCH_VENV)/bin/pip -q --disable-pip-version-check install \
		--no-build-isolation --no-deps -e . && $(CURDIR)/$(GPU_TORCH_VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(GPU_TORCH_VENV) build denseclip_fast/_C*.so *.egg-info
