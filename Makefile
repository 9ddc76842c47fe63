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

.PHONY: setup system-deps horovod demo test test-quick test-mlflow-oldest coverage bench lint clean
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
# .venv), in three tiers (tests/_suite.py: unit, then job, then system; a unit failure stops it
# before any process starts), then the tracking tests again on the oldest MLflow it admits, so the
# declared range is the tested range, then one per-file time table over both passes
# (docs/testing.md keeps the latest). The second venv holds only MLflow (and what that version pins
# differently) and sees the main venv's packages underneath it through a .pth file: torch,
# TensorFlow and Horovod are not installed twice.
MLFLOW_OLDEST := $(shell grep -o '"mlflow>=[0-9.]*' pyproject.toml | head -1 | cut -d= -f2)
OLDEST_VENV ?= .venv-mlflow-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.hvdkit-installed
DURATIONS := .test-durations
# On the oldest MLflow, the tests whose MLflow calls are their own: the store writes (the writer
# and its apply process against real stores), MLflow's internals hvdkit reads, the context
# provider as MLflow loads it, autolog, `hvdkit ui` (MLflow's server), and one real 2-rank job end
# to end. The other job tests make the same calls through the same writer: newest only.
E2E := tests/test_tracking_e2e.py
TRACKING_TESTS ?= tests/test_tracking_job.py tests/test_tracking_spool.py tests/test_tracking_mlflow_private.py \
  tests/test_tracking_context.py tests/test_tracking_apply_process.py tests/test_tracking_efficiency.py \
  tests/test_autolog.py tests/test_framework_autolog_plugins.py \
  "$(E2E)::test_two_rank_job_one_parent_two_children_every_key[torch]" \
  $(E2E)::test_context_tags_on_a_plain_mlflow_script_under_horovodrun $(E2E)::test_ui_serves_the_store_and_prints_the_runs_page

# The unit tier runs first, alone and in this process's order (a failure there stops `make test`
# before any process starts); the job and system tiers then run on TEST_WORKERS pytest-xdist
# workers, dispatched in tier order, each file (or group of files sharing a fixture or a system,
# tests/_suite.py SHARED) on one worker. Two workers on this 2-core machine: a paced or waiting
# system test (an outage, Slurm, elastic) overlaps a CPU-bound job (docs/testing.md).
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS))
test: setup
	@rm -rf $(DURATIONS)
	HVDKIT_TEST_DURATIONS=$(DURATIONS)/unit.json $(BIN)/python -m pytest -m unit $(PYTEST_ARGS)
	HVDKIT_TEST_DURATIONS=$(DURATIONS)/main.json $(BIN)/python -m pytest -m "not unit" $(XDIST) $(PYTEST_ARGS)
	HVDKIT_TEST_DURATIONS=$(DURATIONS)/oldest.json $(MAKE) --no-print-directory test-mlflow-oldest
	@echo "== the slowest test files of both passes (make test)"
	@$(BIN)/python tests/_durations.py $(DURATIONS)/unit.json $(DURATIONS)/main.json "MLflow $(MLFLOW_OLDEST)=$(DURATIONS)/oldest.json"

# The edit-test loop: the unit tier and one real 2-rank job (tests/_suite.py, docs/testing.md).
test-quick: setup
	$(BIN)/python -m pytest -m "unit or quick" $(PYTEST_ARGS)

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
	$(OLDEST_VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS) $(TRACKING_TESTS)

# Line coverage of hvdkit/ over the main pass, the ranks' code included: coverage.py's subprocess
# measurement, started in every Python process of the venv that has COVERAGE_PROCESS_START set by
# a .pth this target writes and removes. Once per change to the suite, not in CI (docs/testing.md).
COVERAGE_DIR := $(CURDIR)/.coverage-data
coverage: setup
	@rm -rf $(COVERAGE_DIR) && mkdir -p $(COVERAGE_DIR)
	@pth="$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_hvdkit_coverage.pth"; \
	  echo 'import os; os.environ.get("COVERAGE_PROCESS_START") and __import__("coverage").process_startup()' > "$$pth"; \
	  HVDKIT_COVERAGE_DIR=$(COVERAGE_DIR) COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml \
	    $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; rm -f "$$pth"; \
	  HVDKIT_COVERAGE_DIR=$(COVERAGE_DIR) $(BIN)/coverage combine -q --rcfile=pyproject.toml && \
	  HVDKIT_COVERAGE_DIR=$(COVERAGE_DIR) $(BIN)/coverage report --rcfile=pyproject.toml | tail -1; exit $$rc

# Benchmarks (JSON lines + a table; ratios measured side by side): see docs/benchmarks.md.
bench: setup
	$(BIN)/python -m bench all

lint: $(STAMP)
	$(BIN)/hadolint docker/Dockerfile.*

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache .coverage-data
