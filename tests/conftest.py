"""Shared helpers: real processes under horovodrun, real MLflow stores in tmp dirs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench._common import job_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_configure(config) -> None:
    from _suite import FileGroups, Suite  # the tiers, their order and guard, the per-file time table

    config.pluginmanager.register(Suite(), "hvdkit-suite")
    if config.pluginmanager.hasplugin("xdist"):  # make test's workers: whole files and groups of files
        config.pluginmanager.register(FileGroups(), "hvdkit-file-groups")


def pytest_addoption(parser) -> None:
    # docs/tutorial.md's screenshots are the browser test's own: `--tutorial-shots docs/img` refreshes them
    parser.addoption("--tutorial-shots", metavar="DIR", default=None,
                     help="also save tests/test_ui_browser.py's screenshots to DIR (e.g. docs/img)")


def pytest_report_header(config) -> str:
    # which end of pyproject's MLflow range this run tests (make test: the newest, then the oldest)
    from importlib.metadata import version

    return f"hvdkit: MLflow {version('mlflow')} ({BIN.parent.name})"


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a job the tests start: the benchmarks' (this venv first on PATH, the
    checkout importable, root allowed for Open MPI, no HOROVOD_* / MLflow store leaking in from
    the caller's shell), plus ``extra``."""
    return job_env(**extra)


def horovodrun(args: list[str], np: int = 2, controller: str = "gloo", timeout: int = 300, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``horovodrun -np N --gloo|--mpi ARGS`` as a real subprocess; output captured as text."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), f"--{controller}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env or worker_env())


def hvdkit(args: list[str], timeout: int = 600, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hvdkit"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env=env or worker_env())


def wait_until(condition, timeout: float = 30.0, what: str = "the condition", interval: float = 0.05):
    """Poll ``condition()`` until it returns something truthy (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``): the tests wait for a state, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def sqlite_store(directory: Path) -> str:
    """A fresh, migrated MLflow sqlite store in ``directory`` (a copy of one made per session: a new
    store's migrations cost seconds in every job that would otherwise create it)."""
    try:
        from test_tracking_support import sqlite_store as copy
    except ImportError:  # tests/ made a package
        from tests.test_tracking_support import sqlite_store as copy
    return copy(directory)


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return sqlite_store(tmp_path)


_NOISE = ("oneDNN custom operations", "cpu_feature_guard", "To enable the following instructions", "absl::InitializeLog")


def explain(proc: subprocess.CompletedProcess, limit: int = 8000) -> str:
    """A failed job's output without TensorFlow's start-up chatter, for assertion messages."""
    text = "\n".join(l for l in (proc.stdout + "\n" + proc.stderr).splitlines() if not any(n in l for n in _NOISE))
    return f"exit {proc.returncode}\n{text[-limit:]}"


# One digits sweep at np=1,2 for the tests that only read what a sweep leaves in the store
# (test_report, test_plan, test_ui_browser): a sweep costs a minute of CI, so it is made once.
# Those tests add to it (report/ again, plan/ on the np=1 job) but never change what another reads.
DIGITS_SWEEP = ["--np", "1,2", "steps=30", "log.every_steps=5", "log.progress=false", "checkpoint.dir=null",
                "eval.enabled=false"]


@pytest.fixture(scope="session")
def digits_sweep(tmp_path_factory) -> dict:
    """``{"tmp", "uri", "env"}`` of a store holding one finished ``hvdkit scale`` digits sweep."""
    try:
        from test_tracking_support import sqlite_store
    except ImportError:  # tests/ made a package
        from tests.test_tracking_support import sqlite_store

    tmp = tmp_path_factory.mktemp("digits-sweep")
    uri = sqlite_store(tmp)
    env = worker_env(MLFLOW_TRACKING_URI=uri)
    res = hvdkit(["scale", str(REPO / "recipes" / "digits.yaml"), *DIGITS_SWEEP], cwd=tmp, env=env)
    assert res.returncode == 0, explain(res)
    return {"tmp": tmp, "uri": uri, "env": env}
