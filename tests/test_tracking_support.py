"""Helpers shared by the tracking tests (no tests here).

* an MLflow sqlite store per test, copied from one template: creating MLflow's schema takes
  seconds, copying the file takes milliseconds;
* ``patient_config``: a TrackingConfig whose start() and close() wait for the store as long as it
  takes, for tests that read the store right after;
* ``FakeWorld``: N "ranks" in one process, with a gather and a broadcast that behave like
  Horovod's as long as the test calls the ranks in the order documented on each method.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np

_template: Path | None = None


# A tracker's start() waits start_timeout_s for the parent run and close() waits close_timeout_s
# for the store; past either it spools and goes on (TrackingConfig's 30 s each: what a dead server
# may cost a job). Tests that read the store right after need both to have happened, and on a
# loaded machine a healthy sqlite store plus the apply child's MLflow import can take longer than
# 30 s (a loaded full run once got run_id None from start()), so here they wait as long as it takes.
PATIENT_S = 300.0


def patient_config(uri: str, spool_dir, **kw):
    """TrackingConfig for a test that reads the store right after start() or finish()."""
    from hvdkit.tracking import TrackingConfig

    kw.setdefault("start_timeout_s", PATIENT_S)
    kw.setdefault("close_timeout_s", PATIENT_S)
    return TrackingConfig(tracking_uri=uri, spool_dir=str(spool_dir), **kw)


def sqlite_store(directory: Path) -> str:
    """A fresh, fully migrated MLflow sqlite store in ``directory``; returns its URI."""
    global _template
    if _template is None:
        from mlflow import MlflowClient

        tmp = Path(tempfile.mkdtemp(prefix="hvdkit-mlflow-template-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        MlflowClient(tracking_uri=f"sqlite:///{tmp}/template.db").search_experiments()
        _template = tmp / "template.db"
    db = directory / "mlflow.db"
    shutil.copy(_template, db)
    return f"sqlite:///{db}"


class FakeWorld:
    """Rank r's collectives for an in-process job of ``size`` ranks.

    Call order: ``start`` and every collective on rank 0 FIRST for broadcasts (rank 0 is the
    root), and LAST for gathers (rank 0 is the only rank that reads the gathered table).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[np.ndarray | None] = [None] * size
        self.root_obj: object = None
        self.gathers = 0
        self.broadcasts = 0

    def gather(self, rank: int):
        def g(vec: np.ndarray) -> np.ndarray:
            self.gathers += 1
            self.slots[rank] = np.array(vec, dtype=np.float64)
            return np.stack([s if s is not None else np.full_like(vec, np.nan) for s in self.slots])

        return g

    def broadcast(self, rank: int):
        def b(obj: object) -> object:
            self.broadcasts += 1
            if rank == 0:
                self.root_obj = obj
            return self.root_obj

        return b

    def trackers(self, config, hostnames=None):
        from hvdkit.tracking import World, open_job_tracker

        hosts = hostnames or [f"host{r // 2}" for r in range(self.size)]
        return [
            open_job_tracker(config, World(r, self.size, r % 2, 2, hosts), self.gather(r), self.broadcast(r))
            for r in range(self.size)
        ]


def start_all(trackers, params=None, tags=None) -> None:
    for t in trackers:  # rank 0 first: it is the broadcast root
        t.start(params or {}, tags or {})


def step_values(rank: int, step: int) -> dict:
    """Distinct, exactly representable numbers per rank and step."""
    return {
        "samples": 32,
        "step_time_s": 0.125 + 0.0625 * rank,
        "data_time_s": 0.0078125,
        "comm_wait_s": 0.03125 * (rank + 1),
        "loss": 2.0 / step + rank,
    }


def step_all(trackers, step: int, values=step_values) -> None:
    for t in reversed(trackers):  # rank 0 last: it reads the gather
        t.record_step(step, **values(t.world.rank, step))


def finish_all(trackers, status: str = "FINISHED") -> None:
    for t in reversed(trackers):
        t.finish(status)


def job_runs(client, experiment: str = "hvdkit"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []
