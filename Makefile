# `make test` creates .venv when missing, installs the package with its test tools, runs the suite.
# CPU path: torch is pinned to the CPU build; an unpinned torch would pull the multi-GB CUDA build.
# DeepSpeed ships as a source package whose build imports torch, hence --no-build-isolation.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: test lint install

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIN)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev]' --config-settings editable_mode=compat
	touch $@

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check megatron_wan data_tools launch tests
