# `make demo` and `make test` create .venv when missing and install the package (with its test tools);
# `make demo` runs the whole method on real footage (TASK=t2v|i2v; MODEL=wan2.2-ti2v: Wan 2.2 TI2V-5B, t2v),
# `make test` runs the suite.
# CPU path: torch is pinned to the CPU build; an unpinned torch would pull the multi-GB CUDA build.
# DeepSpeed ships as a source package whose build imports torch, hence --no-build-isolation.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

TASK ?= t2v
MODEL ?= wan2.1

.PHONY: demo test lint install gpu-check world

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIN)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev]' --config-settings editable_mode=compat
	touch $@

# The whole method on real footage with a tiny random Wan (no weights can be downloaded): outputs/demo/report.md
# (MODEL=wan2.2-ti2v: outputs/demo-wan2.2-ti2v/report.md)
demo: install
	DS_ACCELERATOR=cpu $(PY) -m launch.demo --model $(MODEL) --task $(TASK)

# The procedural world's base model, built from nothing on this machine (README "The world"): outputs/world/base
# and outputs/world/summary.md; finished steps are reused. assets/world/base is the committed build.
world: install
	DS_ACCELERATOR=cpu $(PY) -m launch.world --out outputs/world

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS) tests

# The acceptance check of every CUDA-only path on a GPU machine (README "First run on GPUs"); uses the current
# Python environment (a CUDA torch with the [gpu] extra), not the CPU .venv. Exit code: failed steps.
GPU_PYTHON ?= python
gpu-check:
	$(GPU_PYTHON) -m megatron_wan.bench gpu_check --out outputs/gpu_check

lint: install
	$(VENV)/bin/ruff check megatron_wan data_tools launch tests

# `make eval-env` builds $(EVAL_VENV) for VBench (python -m megatron_wan.eval vbench), apart from .venv because
# vbench pins transformers==4.33.2 and numpy<2. vbench does not declare torch: EVAL_TORCH installs it first, by
# default .venv's torch pin and its torchvision, which PyPI serves as CUDA builds (VBench's launcher needs CUDA).
# torch and torchvision must come from the same build: a +cpu torch (e.g. from a pip find-links folder) cannot load
# PyPI's torchvision. For another CUDA: EVAL_TORCH='torch torchvision --index-url <CUDA wheel index>'.
# Model weights are not installed here (see `python -m megatron_wan.eval vbench --help`).
EVAL_VENV ?= .venv-eval
EVAL_TORCH ?= $(TORCH_PIN) torchvision==0.28.0
VBENCH_PIN ?= vbench==0.1.5

.PHONY: eval-env
eval-env: $(EVAL_VENV)/.installed

$(EVAL_VENV)/.installed:
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install -q --upgrade pip wheel 'setuptools<82'  # openai-clip needs pkg_resources
	$(EVAL_VENV)/bin/python -m pip install -q $(EVAL_TORCH)
	$(EVAL_VENV)/bin/python -m pip install -q $(VBENCH_PIN)
	touch $@
