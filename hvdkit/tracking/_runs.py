"""A job's runs in MLflow: the parent's tags, the events that create (or, on a resume, reopen)
the parent and child runs, and the np=1 baseline the scaling efficiency divides by.

Layout: one parent run per job (``hvdkit.role=parent``) holding params and the job keys, and
one child run per rank (``rank-<r>``, nested through ``mlflow.parentRunId``) holding the
per-rank keys. Only rank 0 calls anything here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hvdkit.tracking import keys
from hvdkit.tracking._config import TrackingConfig
from hvdkit.tracking._uri import resolve_tracking_uri
from hvdkit.tracking._validate import clean_tags
from hvdkit.tracking._world import World, local_ranks

# Identity tags copied from the parent to each child, so child runs can be filtered alone.
INHERITED_TAGS = (
    keys.TAG_RECIPE,
    keys.TAG_FRAMEWORK,
    keys.TAG_BATCH_SIZE,
    keys.TAG_HOST_TYPE,
    keys.TAG_WORLD_SIZE,
    keys.TAG_JOB_ID,
    "slurm.job_id",  # hvdkit.tracking.context.TAG_SLURM_JOB_ID (not imported here: context imports MLflow)
)

# Longest rank 0 waits, before training, for the child runs to exist (see JobTracker._create_runs).
CHILD_RUNS_WAIT_S = 3.0


def client(config: TrackingConfig):
    """A public MlflowClient on the job's store (lookups only: the writer does the writing)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(config.tracking_uri))


def context_tags() -> dict[str, str]:
    """The tags mlflow.start_run would add (user, source, git commit, our Horovod provider...)."""
    from hvdkit.tracking._mlflow_private import context_tags as resolve

    tags = resolve()
    # Our provider's per-process tags describe rank 0, not the job; the job's are in parent_tags.
    tags.pop("horovod.rank", None)
    tags.pop("horovod.hostname", None)
    return tags


def parent_tags(config: TrackingConfig, world: World, job_id: str | None, sampling: int,
                user_tags: Mapping[str, str]) -> dict[str, str]:
    """The parent run's tags: context, the job's identity, then the caller's; the role is ours."""
    from hvdkit.tracking.efficiency import host_type

    tags = context_tags()
    tags.update(
        {
            keys.TAG_WORLD_SIZE: str(world.size),
            keys.TAG_HOST_TYPE: host_type(config.accelerator),
            keys.TAG_JOB_ID: str(job_id),
        }
    )
    if world.hostnames:
        tags[keys.TAG_HOSTS] = ",".join(dict.fromkeys(world.hostnames))
    if sampling > 1:
        tags[keys.TAG_RANK_SAMPLING] = str(sampling)
    tags.update(user_tags)
    tags[keys.TAG_ROLE] = keys.ROLE_PARENT  # the role is ours, whatever the caller passed
    return clean_tags(tags)


def creation_events(config: TrackingConfig, world: World, tags: Mapping[str, str], params: Mapping[str, str],
                    children: list[int], start_time: int) -> list[dict]:
    """The spool events that create the parent run, log its params, and create each child run.
    A resumed job's existing runs are reopened instead, never created again: one training, one
    history."""
    reopen = config.resume_runs
    events: list[dict] = []

    def add(event: dict) -> None:
        if event["op"] == "create_run" and event["ref"] in reopen:
            event = {"op": "reopen_run", "ref": event["ref"], "run_id": reopen[event["ref"]]}
        events.append(event)

    add(
        {
            "op": "create_run",
            "ref": "parent",
            "parent_ref": None,
            "parent_run_id": config.parent_run_id,
            "experiment": config.experiment,
            "run_name": config.run_name or f"{tags.get(keys.TAG_RECIPE, 'hvdkit')}-np{world.size}",
            "tags": dict(tags),
            "start_time": start_time,
        }
    )
    if config.resumes:
        # Params were logged by the first start and cannot change; the resume count is a tag.
        add({"op": "log_batch", "ref": "parent", "metrics": [], "tags": {keys.TAG_RESUMES: str(config.resumes)}})
    elif params:
        # The layout a run is compared by in the UI: ranks per model copy, and copies.
        layout = {"parallel.model": str(config.parallel_model), "parallel.data": str(world.size // config.parallel_model)}
        add({"op": "log_batch", "ref": "parent", "metrics": [], "params": {**dict(params), **layout}, "tags": {}})
    hosts = world.hostnames or [""] * world.size
    inherited = {k: tags[k] for k in INHERITED_TAGS if k in tags}
    local = local_ranks(hosts)
    for r in children:
        child = dict(inherited)
        child.update({keys.TAG_ROLE: keys.ROLE_RANK, keys.TAG_RANK: str(r), keys.TAG_LOCAL_RANK: str(local[r])})
        if config.parallel_model > 1:
            # Consecutive ranks share a model copy (hvdkit.core._layout.ParallelLayout).
            child[keys.TAG_MODEL_RANK] = str(r % config.parallel_model)
            child[keys.TAG_DATA_RANK] = str(r // config.parallel_model)
        if hosts[r]:
            child[keys.TAG_HOST] = hosts[r]
        add(
            {
                "op": "create_run",
                "ref": f"rank{r}",
                "parent_ref": "parent",
                "parent_run_id": None,
                "experiment": config.experiment,
                "run_name": f"rank-{r}",
                "tags": child,
                "start_time": start_time,
            }
        )
    return events


def explicit_baseline(config: TrackingConfig, recipe: str) -> Any:
    """``config.baseline_run_id`` checked (it must exist, be of ``recipe`` and have a
    throughput): an efficiency.Baseline. Raises TrackingError for a wrong id, MlflowException
    when the store cannot be asked."""
    from hvdkit.tracking.efficiency import find_baseline

    return find_baseline(client(config), "", recipe, "", "", "", run_id=config.baseline_run_id)


def matching_baseline(config: TrackingConfig, tags: Mapping[str, str]) -> Any:
    """The latest FINISHED np=1 parent run of the experiment with the same recipe, framework,
    batch size and host type as ``tags`` (a parent's tags), or None. Raises what the store raises."""
    from hvdkit.tracking.efficiency import find_baseline

    mlflow_client = client(config)
    exp = mlflow_client.get_experiment_by_name(config.experiment)
    if exp is None:
        return None
    return find_baseline(
        mlflow_client,
        exp.experiment_id,
        tags.get(keys.TAG_RECIPE, ""),
        tags.get(keys.TAG_FRAMEWORK, ""),
        tags.get(keys.TAG_BATCH_SIZE, ""),
        tags.get(keys.TAG_HOST_TYPE, ""),
    )


__all__ = ["CHILD_RUNS_WAIT_S", "INHERITED_TAGS", "client", "context_tags", "creation_events", "explicit_baseline",
           "matching_baseline", "parent_tags"]
