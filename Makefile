# Two commands do everything on a fresh machine:
#   make test    set up .venv if needed, build the extension, run the whole test suite
#   make bench   set up .venv if needed, run the operator, end-to-end, export, training, data, host, CPU-linear,
#                start-up, checkpoint-read, CRC-32, text-encoder, label-map and predict benchmarks
#                (a small smoke grid on a CPU, the full grids on a GPU; results in benchmarks/results/)
#   make gpu-wheels   the Python 3.12 wheels the GPU test machine lacks, into ./wheels (see benchmarks/gpu_check.sh)
#   make test-gpu-torch   a rehearsal of the GPU session on the CPU: benchmarks/gpu_check.sh's build, GPU-test
#                and CPU-suite steps in a copy of the tree (build/gpu-torch) with the GPU machine's Python 3.12 (where
#                installed) and packages (torch 2.11, triton 3.6); 12 to 17 minutes and 5 GB: run it before a GPU session
#   make test-latest   the CPU suite with the newest releases of every dependency (what a fresh pip install gets)
#   make coverage   the suite under coverage.py: the package's lines and branches that no test runs (about twice
#                make test's time; PYTEST_ARGS=tests/test_cli.py for one file)
PYTHON_SYSTEM ?= python3
VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
CSRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

export HF_HUB_OFFLINE := 1
export MAX_JOBS ?= 2

.PHONY: setup test bench gpu-wheels test-gpu-torch test-latest coverage clean

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

# A file or socket left open (a ResourceWarning, raised in its finaliser and so reported as an unraisable exception)
# fails the test that left it: nine tests had leaked files, unseen, since Python ignores ResourceWarning by default.
# Here only, not in the GPU machine's runs (gpu_check.sh): another torch's finalisers there must not cost a session.
test: setup
	$(PYTHON) -m pytest -q --durations=20 -W error::ResourceWarning -W error::pytest.PytestUnraisableExceptionWarning

PYTEST_ARGS ?=
coverage: setup
	rm -rf build/coverage && mkdir -p build/coverage
	$(PYTHON) -m coverage run -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(PYTHON) -m coverage combine -q
	$(PYTHON) -m coverage report

bench: setup
	$(PYTHON) benchmarks/bench_ops.py
	$(PYTHON) benchmarks/bench_e2e.py
	$(PYTHON) benchmarks/bench_export.py
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_host.py
	$(PYTHON) benchmarks/bench_cpu_linear.py
	$(PYTHON) benchmarks/bench_startup.py --repeats 2  # the smoke: 2 fresh processes (3 by default)
	$(PYTHON) benchmarks/bench_checkpoint_read.py --repeats 1  # the smoke: RN50 official .pth, 1 round (5 by default)
	$(PYTHON) benchmarks/bench_crc.py --repeats 2  # the smoke: 2 rounds (5 by default)
	$(PYTHON) benchmarks/bench_text.py --vocabularies ade20k --modes embed --repeats 2  # the smoke
	$(PYTHON) benchmarks/bench_labels.py --cases 512 --repeats 2  # the smoke
	$(PYTHON) benchmarks/bench_logits_resize.py --cases 512 --repeats 2  # the smoke
	$(PYTHON) benchmarks/bench_predict.py --dtypes float32 --inputs ade --repeats 1  # the smoke

SHARED_WHEELS ?= ../shared/wheels/py312
gpu-wheels: $(VENV)/.deps
	mkdir -p wheels
	rm -f wheels/*.whl  # two versions of one wheel would fail gpu_check.sh's single pip install
	cp $(SHARED_WHEELS)/*.whl wheels/
	$(PIP) download --no-deps -d wheels onnxscript==0.7.2 onnx-ir==1.1.0 cmake==4.4.5

# The GPU machine, rehearsed: its Python (3.12, e.g. from pyenv; else python3), only the packages it has
# (requirements-gpu-machine.lock), a copy of the checkout (tracked and untracked, not ignored files) with ./wheels,
# and the very script a GPU session runs. Fails unless every step exits 0.
PYTHON_GPU ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12) python3)
GPU_TORCH_VENV := .venv-gpu-machine
GPU_TORCH_TREE := build/gpu-torch
# $(call copy_checkout,DIR): a fresh copy of the checkout in DIR (tracked and untracked files, not ignored ones)
define copy_checkout
	rm -rf $(1) && mkdir -p $(1)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(1)
endef
# $(call gpu_machine,DIR,STEPS): a fresh copy of the checkout and ./wheels in DIR, running gpu_check.sh STEPS there
define gpu_machine
	$(call copy_checkout,$(1))
	cp -r wheels $(1)/
	cd $(1) && PATH=$(CURDIR)/$(GPU_TORCH_VENV)/bin:$$PATH DCF_BUDGET_S=3600 DCF_TESTS_S=3600 DCF_WORK=work \
		DCF_SITE=$(CURDIR)/$(GPU_TORCH_TREE)/site bash benchmarks/gpu_check.sh out $(2)
	@echo "steps: $(CURDIR)/$(1)/out/status.txt, logs in $(CURDIR)/$(1)/work"
	# (busy_processes' report of other processes, e.g. a pytest beside it, is information, not a failed step)
	! grep -v -e ": exit 0" -e "prebuilt extension: loaded" -e "^== call at " -e "^busy processes (" \
		-e "^  [0-9.]* [0-9]* " $(1)/out/status.txt
	# what the device tool brings back: at most 8 files; the packed work folder holds every log
	test $$(ls $(1)/out | wc -l) -le 8 && tar tzf $(1)/out/gpu_check.tar.gz | grep -q status.txt
endef
test-gpu-torch: gpu-wheels
	test -x $(GPU_TORCH_VENV)/bin/python || $(PYTHON_GPU) -m venv $(GPU_TORCH_VENV)
	$(GPU_TORCH_VENV)/bin/pip -q --disable-pip-version-check install -r requirements-gpu-machine.lock
	$(call gpu_machine,$(GPU_TORCH_TREE),build info gpu_tests rest save_prebuilt)
	# the extension it built, with the hash of its sources, for the GPU session (gpu_check.sh uses it if it fits)
	rm -rf wheels/prebuilt && cp -r $(GPU_TORCH_TREE)/wheels/prebuilt wheels/
	# and a fresh copy takes it instead of building
	$(call gpu_machine,$(GPU_TORCH_TREE)-2,info)
	grep -q "prebuilt extension: loaded" $(GPU_TORCH_TREE)-2/out/status.txt

# The newest releases, as a fresh `pip install` of the package picks them (no lock file: torch, torchvision, Triton,
# numpy, open_clip, ONNX's packages...): a copy of the checkout in build/latest with its own build of the extension,
# a venv of its own, the whole CPU suite, the versions printed first. A pip configuration that caps versions caps them
# here too (a constraints file: PIP_CONFIG_FILE=/dev/null make test-latest reads none). 25 minutes and 8 GB on 2 cores.
LATEST_VENV := .venv-latest
LATEST_TREE := build/latest
LATEST_PIP := $(CURDIR)/$(LATEST_VENV)/bin/pip -q --disable-pip-version-check install --upgrade --upgrade-strategy eager
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON_SYSTEM) -m venv $(LATEST_VENV)
	$(LATEST_PIP) pip setuptools wheel cmake torch torchvision  # cmake: the C++ examples (torch wants >= 3.26)
	$(call copy_checkout,$(LATEST_TREE))
	cd $(LATEST_TREE) && $(LATEST_PIP) --no-build-isolation -e ".[dev,export]"
	$(LATEST_VENV)/bin/python -c "import sys, torch, triton, numpy; print('Python', sys.version.split()[0], \
		'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	cd $(LATEST_TREE) && $(CURDIR)/$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(GPU_TORCH_VENV) $(LATEST_VENV) .venv-gpu-torch build \
		denseclip_fast/_C*.so denseclip_fast/_C.sources.sha256 *.egg-info
