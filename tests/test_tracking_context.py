"""HorovodRunContextProvider: horovod.* tags on plain mlflow.start_run() inside a launch."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking.context import registry

from hvdkit.tracking import context
from hvdkit.tracking.context import HorovodRunContextProvider

try:
    from test_tracking_support import sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import sqlite_store

LAUNCH_VARS = [
    *context._GLOO,
    "HOROVOD_HOSTNAME",
    "HOROVOD_CONTROLLER",
    *(v for names in context._MPI for v in names),
]
GLOO_ENV = {
    "HOROVOD_RANK": "1",
    "HOROVOD_SIZE": "4",
    "HOROVOD_LOCAL_RANK": "1",
    "HOROVOD_LOCAL_SIZE": "2",
    "HOROVOD_HOSTNAME": "node7",
    "HOROVOD_CONTROLLER": "gloo",
}


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def registered(monkeypatch):
    """The provider in MLflow's registry: through the entry point when hvdkit is installed,
    added by hand otherwise (a plain checkout has no entry points)."""
    reg = registry._run_context_provider_registry
    if not any(isinstance(p, HorovodRunContextProvider) for p in reg):
        monkeypatch.setattr(reg, "_registry", [*reg._registry, HorovodRunContextProvider()])


def test_entry_point_declared():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    eps = pyproject["project"]["entry-points"]["mlflow.run_context_provider"]
    assert eps == {"hvdkit": "hvdkit.tracking.context:HorovodRunContextProvider"}


def test_not_in_context_without_launcher(clean_env):
    p = HorovodRunContextProvider()
    assert p.in_context() is False
    assert p.tags() == {}


def test_gloo_tags_on_a_plain_mlflow_run(clean_env, registered, tmp_path):
    clean_env.chdir(tmp_path)
    for k, v in GLOO_ENV.items():
        clean_env.setenv(k, v)
    clean_env.setattr(importlib.metadata, "version", lambda name: "0.28.1" if name == "horovod" else "0")
    uri = sqlite_store(tmp_path)
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow.start_run() as run:
        pass
    tags = MlflowClient(uri).get_run(run.info.run_id).data.tags
    assert tags["horovod.size"] == "4"
    assert tags["horovod.rank"] == "1"
    assert tags["horovod.local_size"] == "2"
    assert tags["horovod.hostname"] == "node7"
    assert tags["horovod.controller"] == "gloo"
    assert tags["horovod.version"] == "0.28.1"


def test_mpi_launch(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "3")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "8")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    p = HorovodRunContextProvider()
    assert p.in_context()
    tags = p.tags()
    assert tags["horovod.controller"] == "mpi"
    assert (tags["horovod.rank"], tags["horovod.size"], tags["horovod.local_size"]) == ("3", "8", "4")
    assert tags["horovod.hostname"]  # from the socket when the launcher does not say


def test_never_raises(clean_env):
    def boom(*_):
        raise RuntimeError("broken environment")

    clean_env.setattr(context, "_launch", boom)
    p = HorovodRunContextProvider()
    assert p.in_context() is False
    assert p.tags() == {}
