# Two commands on a fresh machine: `make demo` and `make test`. Each sets up everything it needs
# (system packages when root, .venv, pip install, a patched Horovod build from the wheel cache in
# ~/.cache/hvdkit) and is idempotent: a second run skips what is already done.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hvdkit-installed
export OMPI_ALLOW_RUN_AS_ROOT ?= 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2
PYTEST_ARGS ?=
# Extra `hvdkit build-horovod` flags, e.g. HOROVOD_BUILD_ARGS=--gpu (docker/Dockerfile.gpu sets it).
HOROVOD_BUILD_ARGS ?=
# Which extras to install: a dev checkout takes the test tools; the images take only what runs
# (torch,tensorflow,server on CPU; torch,tensorflow-gpu,server on GPU).
EXTRAS ?= torch,tensorflow,dev
# Where pip takes torch from, installed first when set: the images use PyTorch's own wheel index
# (--index-url https://download.pytorch.org/whl/cpu), as PyPI's Linux torch is the CUDA build.
TORCH_PIP_ARGS ?=
TORCH_REQ := $(shell grep -o 'torch==[0-9.]*' pyproject.toml | head -1)

.PHONY: setup system-deps horovod demo test bench lint clean
.DEFAULT_GOAL := demo

setup: system-deps $(STAMP) horovod

system-deps:
	@bash .ci/system-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(if $(TORCH_PIP_ARGS),$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) '$(TORCH_REQ)')
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $@

horovod: $(STAMP)
	$(BIN)/hvdkit build-horovod $(HOROVOD_BUILD_ARGS)

demo: setup
	$(BIN)/hvdkit doctor
	$(BIN)/hvdkit run recipes/digits.yaml -np 2 --framework torch
	$(BIN)/hvdkit run recipes/digits.yaml -np 2 --framework tensorflow

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks (JSON lines + a table; ratios measured side by side): see docs/benchmarks.md.
bench: setup
	$(BIN)/python -m bench all

lint: $(STAMP)
	$(BIN)/hadolint docker/Dockerfile.*

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
