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

.PHONY: setup system-deps horovod demo test test-mlflow-oldest bench lint clean
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

# The demo ends with what hvdkit is for: a scaling sweep (np=1 then np=2, E(2) = T_2 / (2 T_1)) in
# MLflow, and the command that opens it. The sweep's jobs train 3 epochs: ~1 min added, not 2 more full runs.
DEMO_SWEEP := recipes/digits.yaml --np 1,2 --framework torch epochs=3
demo: setup
	$(BIN)/hvdkit doctor
	$(BIN)/hvdkit run recipes/digits.yaml -np 2 --framework torch
	$(BIN)/hvdkit run recipes/digits.yaml -np 2 --framework tensorflow
	$(BIN)/hvdkit scale $(DEMO_SWEEP)
	@echo
	@echo "hvdkit: the sweep above (E(2) in its table, scaling_efficiency on its runs) is in the store (./mlflow.db unless MLFLOW_TRACKING_URI names another); open it with:"
	@echo "    $(BIN)/hvdkit ui"
	@echo "  (then in MLflow: 'Model training', experiment hvdkit, the sweep run and its nested job and rank runs)"

# `make test` runs the whole suite on the newest MLflow pyproject.toml admits (what pip picks for
# .venv), then the tracking tests again on the oldest it admits, so the declared range is the
# tested range. The second venv holds only MLflow (and what that version pins differently) and
# sees the main venv's packages underneath it through a .pth file: torch, TensorFlow and Horovod
# are not installed twice.
MLFLOW_OLDEST := $(shell grep -o '"mlflow>=[0-9.]*' pyproject.toml | head -1 | cut -d= -f2)
OLDEST_VENV ?= .venv-mlflow-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.hvdkit-installed
# (test_resume.py and test_server.py run on the newest only: their MLflow calls are the tracking tests'
# own, and CI has 90 minutes)
TRACKING_TESTS ?= tests/test_tracking_*.py tests/test_autolog.py tests/test_framework_autolog_plugins.py

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-mlflow-oldest

$(OLDEST_STAMP): $(STAMP)
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
	  > "$$($(OLDEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_hvdkit_main_venv.pth"
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip wheel setuptools
	$(OLDEST_VENV)/bin/python -m pip install -q 'mlflow[auth]==$(MLFLOW_OLDEST)'
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test-mlflow-oldest: setup $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/hvdkit build-horovod  # the cached wheel and its marker in this venv (horovodrun)
	$(OLDEST_VENV)/bin/python -c 'import mlflow; from packaging.version import Version as V; \
	  assert V(mlflow.__version__) == V("$(MLFLOW_OLDEST)"), mlflow.__version__; print("tracking tests on MLflow", mlflow.__version__)'
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) $(TRACKING_TESTS)

# Benchmarks (JSON lines + a table; ratios measured side by side): see docs/benchmarks.md.
bench: setup
	$(BIN)/python -m bench all

lint: $(STAMP)
	$(BIN)/hadolint docker/Dockerfile.*

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache
