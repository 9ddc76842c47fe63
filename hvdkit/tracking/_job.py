"""Opening a job's tracker on one rank, and the names the tracking layer's callers import.

The tracker itself lives in rooms of its own: ``_config`` (TrackingConfig and its checks),
``_world`` (World), ``_runs`` (the runs in MLflow, context tags, the np=1 baseline),
``_events`` (gathers as queue items), ``_tracker`` (JobTracker) and ``_null`` (NullJobTracker).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from hvdkit._ids import new_job_id
from hvdkit.tracking import keys
from hvdkit.tracking._apply_process import prestart
from hvdkit.tracking._config import STATUSES, TrackingConfig, validate
from hvdkit.tracking._launch_env import launch_rank
from hvdkit.tracking._null import NullJobTracker
from hvdkit.tracking._rank import NullWriter, rank_zero
from hvdkit.tracking._runs import CHILD_RUNS_WAIT_S
from hvdkit.tracking._spool import Spool
from hvdkit.tracking._tracker import JobTracker
from hvdkit.tracking._uri import absolute_uri, resolve_tracking_uri
from hvdkit.tracking._world import World
from hvdkit.tracking._writer import SpoolWriter


def prestart_writer() -> None:
    """On the rank that will write (rank 0 as the launcher numbered it), start the writer's apply
    process now, at the process's start: it imports MLflow while the framework loads and
    ``hvd.init`` runs, and :func:`open_job_tracker`'s writer takes it. Elsewhere nothing."""
    if launch_rank() == 0:
        prestart()


def open_job_tracker(
    config: TrackingConfig,
    world: World,
    gather: Callable[[np.ndarray], Any],
    broadcast_object: Callable[[object], object],
    gather_async: Callable[[np.ndarray], Callable[[], Any]] | None = None,
) -> JobTracker | NullJobTracker:
    """The tracker for this rank. ``gather(vec)`` must be an allgather returning ``[size, k]``
    (rank order); ``broadcast_object(obj)`` returns rank 0's ``obj`` on every rank;
    ``gather_async(vec)``, optional, starts the same allgather and returns a function waiting
    for its result (the intervals' gathers then overlap training)."""
    if not config.enabled:
        return NullJobTracker()
    validate(config, world)
    uri = resolve_tracking_uri(config.tracking_uri)
    # A launcher (hvdkit run / scale) names the job itself, so that after the workers exit it can
    # find the job's runs by their job_id tag and correct a status they could not know (a rank
    # SIGTERMed by horovodrun because a peer failed records KILLED; the job FAILED).
    job_id = rank_zero(world.rank, lambda: config.job_id or os.environ.get(keys.ENV_JOB_ID) or new_job_id())

    def make_writer() -> SpoolWriter:
        # A resumed job writes a spool of its own (<job id>.r<n>) next to the first one's.
        name = f"{job_id}.r{config.resumes}" if config.resumes and job_id else None
        spool = Spool.create(config.spool_dir, job_id or new_job_id(), absolute_uri(uri), name=name)
        return SpoolWriter(spool, uri, keep_spool=config.keep_spool, apply_process=True)

    writer = rank_zero(world.rank, make_writer, default=NullWriter())
    return JobTracker(config, world, gather, broadcast_object, writer, job_id, gather_async=gather_async)


__all__ = ["CHILD_RUNS_WAIT_S", "STATUSES", "JobTracker", "NullJobTracker", "TrackingConfig", "World", "open_job_tracker",
           "prestart_writer"]
