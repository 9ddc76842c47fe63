"""What a job's tracking is asked to do (``TrackingConfig``), and the checks made before any
collective: a bad setting fails on every rank at once instead of hanging a broadcast."""

from __future__ import annotations

from dataclasses import dataclass, field

from hvdkit._ids import experiment_name
from hvdkit.errors import TrackingError, UsageError
from hvdkit.tracking import keys
from hvdkit.tracking._world import World

STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    # Default: hvdkit._ids.experiment_name() ($MLFLOW_EXPERIMENT_NAME, else "hvdkit"), the name the
    # launcher and the ranks resolve too.
    experiment: str = field(default_factory=experiment_name)
    run_name: str | None = None
    log_every: int = 10  # steps between gathers
    # Rank 0 hands the gathered metrics to the writer at most this often (seconds): every
    # hand-off wakes the writer's threads for a store transaction that contends for the GIL with
    # training, so a gather every few milliseconds must not mean a transaction every few ms (fast-
    # step recipe, docs/benchmarks.md: the writer's CPU during training fell from ~11% to ~1% of
    # rank 0's time, hvdkit/none from 0.76 to 0.96). Metrics keep the timestamp and step of their
    # gather; 0 hands each gather over at once. Up to this much is lost if rank 0 is SIGKILLed.
    flush_every_s: float = 1.0
    # False: no child runs; k: a child run for every k-th rank only (parent keys still use all ranks)
    per_rank_runs: bool | int = True
    spool_dir: str | None = None  # root of the spools; default ./hvdkit-spool
    parent_run_id: str | None = None  # nest the job under a sweep run
    keep_spool: bool = False  # keep the spool even when fully applied
    start_timeout_s: float = 30.0  # how long start() waits for the parent run id before spooling blind
    close_timeout_s: float = 30.0  # how long finish() lets the store catch up before leaving a spool
    # Scaling efficiency, logged by finish(FINISHED) on jobs of more than one rank: against this
    # run (checked by start(): it must exist and be of the same recipe), else the latest matching
    # np=1 run of the experiment (see efficiency.find_baseline).
    baseline_run_id: str | None = None
    log_efficiency: bool = True
    # Per-rank keys the caller cannot measure (hvdkit.autolog sees no loss, and no sample count
    # without a batch size): logged nowhere, rather than as zeros that look like measurements.
    # Skipping samples_per_sec also skips the parent's sum and scaling efficiency.
    skip_keys: frozenset[str] = frozenset()
    # The job (hvdkit.core.job decides it on rank 0; None: $HVDKIT_JOB_ID, else a new id). On a
    # resume, ``resume_runs`` maps refs ("parent", "rank<r>") to the job's existing MLflow runs:
    # they are reopened (RUNNING again) instead of created, and ``resumes`` is the new count.
    job_id: str | None = None
    resume_runs: dict[str, str] = field(default_factory=dict)
    resumes: int = 0
    # The device the ranks train on, as the framework layer names it (e.g. "NVIDIA H100 80GB
    # HBM3"); None on CPU. Part of the hvdkit.host_type tag, so a GPU job never takes a CPU run as
    # its np=1 scaling baseline (efficiency.host_type).
    accelerator: str | None = None
    # Ranks per model copy (recipe parallel.model): the parent records parallel.model/.data, each
    # child run its model- and data-parallel rank, and layer_comm_s is logged when it is > 1.
    parallel_model: int = 1
    # Seconds between system-metric samples (CPU, memory, network, disk, GPU) of each host, taken
    # by one rank per host and logged on its child run (tracking/_system.py); 0: off. hvdkit run
    # passes the recipe's log.system_metrics_interval_s; off for direct users (hvdkit.autolog).
    system_metrics_interval_s: float = 0.0


def sampling(per_rank_runs: bool | int) -> int:
    """Every how many ranks a child run is made; 0 for none."""
    if per_rank_runs is True:
        return 1
    if per_rank_runs is False:
        return 0
    if isinstance(per_rank_runs, int) and per_rank_runs >= 1:
        return per_rank_runs
    raise UsageError(
        f"tracking per_rank_runs={per_rank_runs!r} is not true, false or a positive int",
        fix="use true (a run per rank), false (none) or k >= 1 (every k-th rank)",
    )


def validate(config: TrackingConfig, world: World) -> None:
    if not isinstance(config.log_every, int) or config.log_every < 1:
        raise UsageError(f"tracking log_every={config.log_every!r} must be an int >= 1", fix="e.g. log_every: 10")
    sampling(config.per_rank_runs)
    interval = config.system_metrics_interval_s
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < float("inf"):
        raise UsageError(f"tracking system_metrics_interval_s={interval!r} must be a number of seconds >= 0",
                         fix="e.g. log.system_metrics_interval_s=10 (0: off)")
    unknown = set(config.skip_keys) - keys.RANK_KEY_NAMES
    if unknown:
        raise UsageError(f"tracking skip_keys {sorted(unknown)} are not per-rank keys", fix=f"pick from {list(keys.RANK_VECTOR)}")
    if not isinstance(config.parallel_model, int) or config.parallel_model < 1 or world.size % config.parallel_model:
        raise UsageError(f"tracking parallel_model={config.parallel_model!r} does not divide {world.size} ranks",
                         fix="pass the recipe's parallel.model")
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise UsageError(f"rank {world.rank} of size {world.size} is not a valid world", fix="fill World from hvd")
    if world.hostnames and len(world.hostnames) != world.size:
        raise UsageError(
            f"World.hostnames has {len(world.hostnames)} entries for {world.size} ranks",
            fix="gather one hostname per rank",
        )


def validate_experiment(config: TrackingConfig) -> None:
    """MLflow's rule for the experiment name. Rank 0 checks it in ``JobTracker.start`` and shares the
    error, so every rank fails alike; the rule imports MLflow, which the other ranks never need
    (over a second of a rank's start: docs/testing.md)."""
    from hvdkit.tracking._mlflow_private import experiment_name_problem

    problem = experiment_name_problem(config.experiment)
    if problem is not None:
        raise TrackingError(f"experiment name {config.experiment!r}: {problem}", fix="pick another name")


__all__ = ["STATUSES", "TrackingConfig", "sampling", "validate", "validate_experiment"]
