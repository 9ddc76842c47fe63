"""The per-rank process of an elastic job (``hvdkit run --elastic``, or horovodrun with
``--min-np`` / ``--host-discovery-script``): :mod:`hvdkit.train` hands over here right after
``hvd.init()`` when Horovod says the job is elastic (``HOROVOD_ELASTIC=1``).

What differs from a fixed-size job is *when* things happen. A worker that joins later starts
this same process while the others are inside ``hvd.elastic.run``; Horovod requires that it run
no collective before entering it. So the job decision, the hostnames' gather and the creation of
the MLflow runs, which a fixed-size job does before training, happen here inside the wrapped
function, at every (re)entry, on every rank at the same point (:meth:`ElasticTracking.sync`).
Everything a process knows before that is local: rank 0 at start decides the job (a new id, or
the ``--resume`` target, whose checkpoint it loads so the first sync broadcasts it), opens the
tracker and its writer; any other worker waits to be told.

One job, one parent run: a reset continues the same runs (the same rule as ``--resume``); a
joiner gets a child run of its own; see :mod:`hvdkit.tracking._membership`.
"""

from __future__ import annotations

import signal
from importlib import import_module
from typing import Any

from hvdkit._rank import from_rank_zero, rank_zero
from hvdkit.errors import HvdkitError


def train_elastic(loaded, backend, data, *, no_track=False, log_every=None, experiment=None, baseline=None,
                  parent_run_id=None, resume=None, force=False) -> int:
    from hvdkit.core import print_summary
    from hvdkit.core.elastic import run_elastic_training
    from hvdkit.tracking import World, open_job_tracker
    from hvdkit.tracking._membership import ElasticTracking
    from hvdkit.train import (
        _Killed,
        _decide_job,
        _job_from,
        _params,
        _progress_bar,
        _stop_handler,
        _tracking_config,
        end_job,
        log_job_artifacts,
    )

    recipe = loaded.recipe
    support = import_module(f"hvdkit.{recipe.framework}._elastic").make_support(backend, data)
    start_rank = backend.rank
    # Rank 0 at start is the job's first rank 0 (Horovod never gives rank 0 to a joiner): it
    # decides the job alone; the others learn it at the first sync.
    job_box: dict[str, Any] = {}

    def decide() -> None:
        # An error (e.g. a bad --resume) is raised on every rank at the first sync, not here:
        # rank 0 alone leaving would leave the others to Horovod's elastic timeout.
        job_box["shared"] = _decide_job(recipe, None, resume, force, not no_track, experiment)
        if not job_box["shared"].get("error"):
            job_box["job"] = _job_from(job_box["shared"])

    rank_zero(start_rank, decide)
    job = job_box.get("job")
    config = _tracking_config(recipe, no_track, log_every, experiment, parent_run_id, job, backend.accelerator)
    config.baseline_run_id = baseline
    world0 = World(rank=start_rank, size=backend.size)
    tracker = open_job_tracker(config, world0, gather=backend.gather, broadcast_object=backend.broadcast_object,
                               gather_async=getattr(backend, "gather_async", None))
    tracking = None
    if config.enabled:
        tracking = ElasticTracking(
            tracker, gather=backend.gather, broadcast_object=backend.broadcast_object, params=_params(recipe),
            tags={"hvdkit.recipe": recipe.name, "hvdkit.framework": recipe.framework,
                  "hvdkit.batch_size": str(recipe.batch_size)},
            batch_size=recipe.batch_size)

    def on_membership(step: int, reason: str) -> None:
        # The job as rank 0 decided it, to every rank (a joiner learns it here).
        shared = from_rank_zero(backend.rank, support.broadcast_object, job_box.get, "shared")
        if shared is None:
            raise HvdkitError("rank 0 of this elastic job does not know the job (it joined later)")
        job_box["shared"], job_box["job"] = shared, _job_from(shared)  # raises rank 0's error everywhere
        if tracking is not None:
            tracking.sync(step, reason, backend.rank, backend.size, support.local_rank())
            if tracker.run_id and job_box.get("job") is not None:
                rank_zero(backend.rank, job_box["job"].update, parent_run_id=tracker.run_id,
                          runs={**job_box["job"].manifest.get("runs", {}), **tracker.run_ids()}, elastic=True,
                          world_size=backend.size, membership_changes=tracking.changes)

    previous = {sig: signal.signal(sig, _stop_handler(start_rank)) for sig in (signal.SIGTERM, signal.SIGINT)}
    status, summary = "FAILED", None
    try:
        progress = _progress_bar if recipe.log.progress else None
        summary = run_elastic_training(
            backend, support, recipe, data, tracker, on_membership=on_membership,
            before_hosts_reset=tracker.flush_interval if tracking is not None else None,
            on_finish=(lambda step: tracker.flush_interval()) if tracking is not None else None,
            commit_every=config.log_every, progress=progress, job=lambda: job_box.get("job"))
        rank_zero(backend.rank, print_summary, summary, recipe, backend.size)
        log_job_artifacts(tracker, summary, loaded)
        status = "FINISHED"
        return 0
    except _Killed:
        status = "KILLED"
        return 130
    finally:
        steps = summary.steps if summary else getattr(tracker, "_last_step", 0)
        # Rank 0 now may be a survivor that took over: its job folder is the one broadcast.
        job_now = rank_zero(backend.rank, job_box.get, "job") if tracker.run_id else None
        close = (lambda: rank_zero(backend.rank, tracking.close, steps, status)) if tracking is not None else None
        end_job(tracker, job_now, status, steps, previous, before_finish=close)


__all__ = ["train_elastic"]
