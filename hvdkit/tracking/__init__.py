"""MLflow tracking for hvdkit jobs, framework-free (imports no torch, TensorFlow or Horovod).

* :func:`open_job_tracker` -> a :class:`JobTracker` per rank: parent run + one child run per
  rank, metrics gathered every ``log_every`` steps and written by rank 0 only;
* events go through a local spool first, so an unreachable store never stalls or fails
  training; :func:`sync_spool` (``hvdkit sync DIR``) replays what the store did not get;
* :mod:`hvdkit.tracking.efficiency`: scaling efficiency against an np=1 baseline;
* :mod:`hvdkit.tracking.keys`: every metric key and tag name, defined once.

The names below load on first use. That is not only for import time: MLflow loads our run
context provider (``hvdkit.tracking.context``) while ``import mlflow`` is still running, and
that imports this package first; an eager ``from mlflow import MlflowClient`` here would then
hit a half-initialised mlflow and the provider would fail to register.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "JobTracker": "hvdkit.tracking._job",
    "NullJobTracker": "hvdkit.tracking._job",
    "TrackingConfig": "hvdkit.tracking._job",
    "World": "hvdkit.tracking._job",
    "open_job_tracker": "hvdkit.tracking._job",
    "prestart_writer": "hvdkit.tracking._job",
    "rank_zero": "hvdkit.tracking._rank",
    "rank_zero_only": "hvdkit.tracking._rank",
    "resolve_tracking_uri": "hvdkit.tracking._uri",
    "flatten_params": "hvdkit.tracking._validate",
    "HorovodRunContextProvider": "hvdkit.tracking.context",
    "Baseline": "hvdkit.tracking.efficiency",
    "find_baseline": "hvdkit.tracking.efficiency",
    "host_type": "hvdkit.tracking.efficiency",
    "run_throughput": "hvdkit.tracking.efficiency",
    "scaling_efficiency": "hvdkit.tracking.efficiency",
    "write_sweep_artifacts": "hvdkit.tracking.efficiency",
    "SyncReport": "hvdkit.tracking.sync",
    "sync_spool": "hvdkit.tracking.sync",
}


_SUBMODULES = ("keys", "context", "efficiency", "sync")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"hvdkit.tracking.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hvdkit.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from hvdkit.tracking import keys
    from hvdkit.tracking._job import JobTracker, NullJobTracker, TrackingConfig, World, open_job_tracker, prestart_writer
    from hvdkit.tracking._rank import rank_zero, rank_zero_only
    from hvdkit.tracking._uri import resolve_tracking_uri
    from hvdkit.tracking._validate import flatten_params
    from hvdkit.tracking.context import HorovodRunContextProvider
    from hvdkit.tracking.efficiency import (
        Baseline,
        find_baseline,
        host_type,
        run_throughput,
        scaling_efficiency,
        write_sweep_artifacts,
    )
    from hvdkit.tracking.sync import SyncReport, sync_spool

__all__ = sorted([*_EXPORTS, "keys"])
