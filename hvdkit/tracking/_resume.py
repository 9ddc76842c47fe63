"""What tracking knows about an earlier job, for a resume: its runs in the store, and its spools.

A resumed job reopens its runs (see ``JobTracker``: ``reopen_run`` events). Their ids come from
the job's manifest; these helpers find them in the store when the manifest lacks them (rank 0
died before writing it), resolve ``--resume RUN_ID``, and replay a spool the earlier job left
(store unreachable then) before the resumed job starts, so no run is created twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvdkit.errors import TrackingError
from hvdkit.tracking import keys
from hvdkit.tracking._spool import DEFAULT_ROOT, Spool
from hvdkit.tracking._uri import resolve_tracking_uri

# Longest a launcher waits on the store for one of these look-ups.
LOOKUP_TIMEOUT_S = 30.0


def _bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """``fn()`` on a daemon thread (MLflow's HTTP client retries a dead server for minutes)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(("ok", fn()))
        except Exception as exc:  # noqa: BLE001 - reported to the caller as one line
            box.append(("error", exc))

    t = threading.Thread(target=target, name="hvdkit-lookup", daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise TrackingError(f"{what}: the MLflow store did not answer within {timeout:.0f}s",
                            fix="make the store reachable (MLFLOW_TRACKING_URI) and try again")
    kind, value = box[0]
    if kind == "error":
        if isinstance(value, TrackingError):
            raise value
        raise TrackingError(f"{what}: {type(value).__name__}: {value}",
                            fix="make the store reachable (MLFLOW_TRACKING_URI) and try again")
    return value


def job_runs(client, experiment: str, job_id: str) -> list:
    """Every run (parent and children) of one job, found by its ``hvdkit.job_id`` tag."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = f"tags.`{keys.TAG_JOB_ID}` = '{job_id}'"  # job ids are [0-9A-Za-z._-]: no quoting issue
    return list(client.search_runs([exp.experiment_id], filter_string=flt, max_results=10_000))


def run_refs(runs: list) -> dict[str, str]:
    """{"parent": id, "rank<r>": id} of one job's runs."""
    out = {}
    for run in runs:
        tags = run.data.tags
        if tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT:
            out["parent"] = run.info.run_id
        elif tags.get(keys.TAG_ROLE) == keys.ROLE_RANK and tags.get(keys.TAG_RANK, "").isdigit():
            out[f"rank{tags[keys.TAG_RANK]}"] = run.info.run_id
    return out


def find_job_runs(job_id: str, experiment: str, tracking_uri: str | None = None,
                  timeout: float = LOOKUP_TIMEOUT_S) -> dict[str, str]:
    from mlflow import MlflowClient

    def lookup() -> dict[str, str]:
        client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        return run_refs(job_runs(client, experiment, job_id))

    return _bounded(lookup, timeout, f"finding the runs of job {job_id}")


def job_of_run(run_id: str, tracking_uri: str | None = None, timeout: float = LOOKUP_TIMEOUT_S) -> str | None:
    """The hvdkit job id of MLflow run ``run_id`` (parent or child), None if the store has no such run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def lookup() -> str | None:
        client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return run.data.tags.get(keys.TAG_JOB_ID)

    return _bounded(lookup, timeout, f"looking up run {run_id}")


def earlier_spools(job_id: str, root: str | Path | None = None) -> list[Path]:
    """Spool directories an earlier start of ``job_id`` left (``<job id>`` and ``<job id>.r<n>``)."""
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        return []
    return sorted(d for d in base.iterdir() if d.is_dir() and (d.name == job_id or d.name.startswith(job_id + ".r")))


def replay_earlier_spools(job_id: str, root: str | Path | None = None, tracking_uri: str | None = None,
                          timeout: float = LOOKUP_TIMEOUT_S) -> dict[str, str]:
    """Before a resume: deliver what earlier starts of the job left in their spools (their runs
    must exist before they can be reopened). Returns the runs they hold (ref -> run id); a spool
    the store will not take is one clear error naming it."""
    from hvdkit.tracking.sync import sync_spool

    runs: dict[str, str] = {}
    for d in earlier_spools(job_id, root):
        Spool.open(d)  # a corrupt spool is named, not silently skipped
        rep = _bounded(lambda d=d: sync_spool(str(d), tracking_uri), timeout, f"replaying spool {d}")
        runs = {**rep.runs, **runs}
    return runs


__all__ = ["earlier_spools", "find_job_runs", "job_of_run", "job_runs", "replay_earlier_spools", "run_refs"]
