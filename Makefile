# The README's commands. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU wheel of torch: an unpinned torch would pull ~3 GB of CUDA wheels on a CPU machine.
TORCH_VERSION ?= 2.13.0
NVCC   ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCHS ?= 80 90
PYTEST_ARGS ?=

.PRECIOUS: $(VENV)/.installed-%
.PHONY: help venv install build demo test test-all lint bench cuda-check cuda-bind-check triton-check gpu-run clean

help:
	@echo "make demo        run the demo (mFTI on a real small model, before/after scores)"
	@echo "make test        lint + fast test suite (+ cuda-check when nvcc exists, triton-check when triton is installed)"
	@echo "make lint        ruff check and ruff format --check (line length 120, isort)"
	@echo "make test-all    every test, slow end-to-end ones included"
	@echo "make bench       pytest-benchmark suites; writes bench/results/<device>.md"
	@echo "make cuda-check  compile every csrc/cuda/*.cu for sm_80 and sm_90 (no GPU needed)"
	@echo "make triton-check compile every Triton kernel specialisation for sm_80 and sm_90 (no GPU needed)"
	@echo "make gpu-run     on a GPU machine: build in place, tests/gpu, benchmarks -> bench/results/<device>.md"
	@echo "make build       rebuild mmt_kernels._C in place (incremental)"

# A machine whose python already has a CUDA torch (a GPU machine, often without registry access) gets a venv
# that sees it, and installs nothing from a registry: no torch, no pinned Triton, no dependencies.
HOST_CUDA_TORCH := $(shell $(PYTHON) -c "import torch; print(1 if torch.version.cuda else '')" 2>/dev/null)

$(PY):
ifeq ($(HOST_CUDA_TORCH),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
else
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
endif

# Marker files: reinstall when the packaging metadata changes; rebuild _C incrementally (ninja)
# when a kernel source changes. A fresh install builds _C itself, so it also stamps .built.
KERNEL_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*)
$(VENV)/.installed-%: pyproject.toml setup.py | $(PY)
ifeq ($(HOST_CUDA_TORCH),1)
	$(PIP) install -q --no-build-isolation --no-deps -e .
else
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' or torch.version.cuda else 1)" 2>/dev/null \
		|| $(PIP) install -q torch==$(TORCH_VERSION) numpy
	$(PIP) install -q --no-build-isolation -e ".[$*]"
endif
	@$(PY) -c "import torch; print('torch', torch.__version__, '(cuda ' + str(torch.version.cuda) + ')')"
	@touch $@ $(VENV)/.built

$(VENV)/.built: $(KERNEL_SOURCES) | $(PY)
	flock .build.lock $(PY) setup.py -q build_ext --inplace
	@touch $@

venv install: $(VENV)/.installed-dev

build: $(VENV)/.installed-dev
	flock .build.lock $(PY) setup.py -q build_ext --inplace
	@touch $(VENV)/.built

demo: $(VENV)/.installed-demo $(VENV)/.built
	$(VENV)/bin/mmt demo

test: $(VENV)/.installed-dev $(VENV)/.built
	@$(MAKE) --no-print-directory lint
	@if [ -n "$(NVCC)" ]; then $(MAKE) --no-print-directory cuda-check; else echo "cuda-check skipped: nvcc not found"; fi
	@$(MAKE) --no-print-directory triton-check
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-all: $(VENV)/.installed-dev $(VENV)/.built
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed-dev $(VENV)/.built
	$(PY) -m pytest bench -q --benchmark-only $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

CUDA_CHECK_OUT := build/cuda-check
cuda-check:
	@test -n "$(NVCC)" || { echo "cuda-check: nvcc not found"; exit 1; }
	@mkdir -p $(CUDA_CHECK_OUT)
	@set -e; for f in csrc/cuda/*.cu; do \
		for a in $(CUDA_ARCHS); do \
			$(NVCC) $$(cat csrc/cuda/nvcc.flags) -Icsrc -gencode arch=compute_$$a,code=sm_$$a -c $$f -o $(CUDA_CHECK_OUT)/$$(basename $$f .cu)-sm$$a.o; \
		done; echo "cuda-check: $$f ok (sm_$(shell echo $(CUDA_ARCHS) | sed 's/ /, sm_/g'))"; \
	done

# Syntax-checks the torch glue (csrc/cuda/*.cpp) against the headers of a CUDA torch wheel, which
# the CPU wheel lacks: TORCH_CUDA_INCLUDE=<unzipped wheel>/torch/include make cuda-bind-check
# (get them with `pip download --no-deps torch==$(TORCH_VERSION) --index-url https://pypi.org/simple`
# and `unzip <wheel> 'torch/include/*'`).
# The toolkit's include dir, as nvcc itself reports it (nvcc may be a wrapper script on PATH).
CUDA_INCLUDE ?= $(shell $(NVCC) -v --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p')/include
cuda-bind-check:
	@test -n "$(TORCH_CUDA_INCLUDE)" || { echo "cuda-bind-check: set TORCH_CUDA_INCLUDE to a CUDA torch's include dir"; exit 1; }
	@set -e; for f in csrc/cuda/*.cpp; do \
		g++ -std=c++20 -fsyntax-only -DMMT_WITH_CUDA=1 -Icsrc -I$(TORCH_CUDA_INCLUDE) \
			-I$(TORCH_CUDA_INCLUDE)/torch/csrc/api/include -I$(CUDA_INCLUDE) \
			-I$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])") $$f; \
		echo "cuda-bind-check: $$f ok"; \
	done

# Registers and spills per kernel; fails on any compile error. TRITON_CHECK_ARGS="--only merge" narrows it.
TRITON_CHECK_ARGS ?=
triton-check:
	@if $(PY) -c "import triton" 2>/dev/null; then \
		env -u TRITON_INTERPRET $(PY) -m mmt_kernels.triton.compile_check $(TRITON_CHECK_ARGS); \
	else echo "triton-check skipped: triton is not installed"; fi

gpu-run:
	bash bench/gpu_run.sh

clean:
	rm -rf build *.egg-info mmt_kernels/_C*.so .pytest_cache
