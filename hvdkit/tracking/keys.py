"""Every metric key and tag name hvdkit logs, defined once.

Trainers, the job tracker, the efficiency lookup and the docs all read these tables, so a
key is spelled in exactly one place and a dashboard built on it cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["rank", "job"]


@dataclass(frozen=True)
class MetricKey:
    name: str
    unit: str
    meaning: str
    scope: Scope


SYSTEM_PREFIX = "system/"  # MLflow's prefix for system metrics
# GPUs per host with columns in the gather (each costs 3 floats per rank per gather, NaN where
# absent); a host with more logs its first MAX_GPUS and says so once.
MAX_GPUS = 8
_HOST_SYSTEM = (
    ("cpu_utilization_percentage", "%", "host CPU utilisation since the previous sample (all cores)"),
    ("system_memory_usage_megabytes", "MB", "host memory in use"),
    ("system_memory_usage_percentage", "%", "host memory in use, of the total"),
    ("network_receive_megabytes", "MB", "bytes the host received since the sampler started"),
    ("network_transmit_megabytes", "MB", "bytes the host sent since the sampler started"),
    ("disk_usage_percentage", "%", "root file system in use"),
    ("disk_usage_megabytes", "MB", "root file system in use"),
    ("disk_available_megabytes", "MB", "root file system free"),
)
_GPU_SYSTEM = (
    ("utilization_percentage", "%", "utilisation of GPU {i} (NVML)"),
    ("memory_usage_megabytes", "MB", "memory in use on GPU {i} (NVML)"),
    ("memory_usage_percentage", "%", "memory in use on GPU {i}, of its total (NVML)"),
)
SYSTEM_KEYS_TABLE: tuple[MetricKey, ...] = (
    *(MetricKey(SYSTEM_PREFIX + n, u, m, "rank") for n, u, m in _HOST_SYSTEM),
    *(MetricKey(f"{SYSTEM_PREFIX}gpu_{i}_{n}", u, m.format(i=i), "rank") for i in range(MAX_GPUS) for n, u, m in _GPU_SYSTEM),
)
SYSTEM_VECTOR: tuple[str, ...] = tuple(k.name for k in SYSTEM_KEYS_TABLE)
"""Column order of a HostSampler sample; appended, in this order, to RANK_VECTOR."""
SYSTEM_RANK_KEYS = frozenset(SYSTEM_VECTOR)

# Per-rank keys, logged on each child run ``rank-<r>``. The ORDER of this tuple is the layout of
# the vector each rank contributes to the gather (``RANK_VECTOR``), so append, never reorder.
RANK_KEYS: tuple[MetricKey, ...] = (
    MetricKey("samples_per_sec", "samples/s", "samples / (step + data time) over the interval", "rank"),
    MetricKey("step_time_s", "s", "mean time of one step (forward, backward, update) over the interval", "rank"),
    MetricKey("data_time_s", "s", "mean time waiting for the next batch over the interval", "rank"),
    MetricKey("comm_wait_s", "s", "mean time blocked on gradient averaging per step", "rank"),
    MetricKey("loss", "", "mean training loss over the interval", "rank"),
    MetricKey("rss_mb", "MiB", "resident memory of the rank's process at the gather", "rank"),
    # Model parallelism (recipe ``parallel.model`` > 1): comm_wait_s stays the gradient averaging
    # (over the data-parallel group); this is the split layers' own collectives, in the forward
    # and backward pass. Not logged when the model is not split.
    MetricKey("layer_comm_s", "s", "mean time in the model-parallel layers' collectives per step", "rank"),
    # Sparse keys (SPARSE_RANK_KEYS): logged when they change, not every interval.
    MetricKey("peak_rss_mb", "MiB", "peak resident memory of the rank's process so far", "rank"),
    MetricKey("parameters", "", "model parameters this rank holds (a slice of the model when it is split)", "rank"),
    # System metrics (recipe log.system_metrics_interval_s; tracking/_system.py): one sampler per
    # host, in the host's lowest rank that has a child run (local rank 0 by default), so only that
    # child run holds them (tag TAG_SYSTEM_METRICS_HOST). Named exactly as MLflow's own system
    # metrics (mlflow/system_metrics/metrics/*.py, "MB" = 1e6 bytes) so the UI's "System metrics"
    # section draws them. Sparse: a point at the first gather after each new sample.
    *SYSTEM_KEYS_TABLE,
)

# Job keys, logged on the parent run.
JOB_KEYS: tuple[MetricKey, ...] = (
    MetricKey("samples_per_sec", "samples/s", "sum of the ranks' samples_per_sec at the same step", "job"),
    MetricKey("loss", "", "mean of the ranks' loss at the same step", "job"),
    MetricKey("val_loss", "", "validation loss, already averaged over ranks", "job"),
    MetricKey("val_accuracy", "", "validation accuracy, already averaged over ranks", "job"),
    MetricKey("replicas_equal", "", "1 when every rank's parameters equal its replicas' after training, else 0", "job"),
    MetricKey("straggler_ratio", "", "max / median of the ranks' step_time_s at the same step", "job"),
    MetricKey("world_size", "ranks", "number of ranks of the job", "job"),
    MetricKey("scaling_efficiency", "", "T_N / (N * T_1), T = samples_per_sec, T_1 from an np=1 baseline", "job"),
    MetricKey("samples_per_sec_end_to_end", "samples/s",
              "sum of the ranks' samples / wall seconds of training, evaluation and checkpoints included (one point, at the end)",
              "job"),
    # Elastic jobs (hvdkit.tracking._membership): a membership epoch is the span between two
    # membership changes. Event keys are logged at the step of the change; the per-epoch
    # keys at the epoch's first step, once it ended.
    MetricKey("membership_epoch", "", "index of the membership epoch that starts at this step (one point per change)", "job"),
    MetricKey("membership_joined", "ranks", "workers that joined at this change", "job"),
    MetricKey("membership_left", "ranks", "workers that left (failed or removed) at this change", "job"),
    MetricKey("membership_samples_per_sec", "samples/s", "the epoch's T: mean of its samples_per_sec gathers", "job"),
    MetricKey("membership_scaling_efficiency", "", "the epoch's T / (N * T_1), N its world size, T_1 from an np=1 baseline", "job"),
)

# Names, for code that refers to one key (``keys.SAMPLES_PER_SEC`` rather than a string literal).
SAMPLES_PER_SEC = "samples_per_sec"
STEP_TIME_S = "step_time_s"
DATA_TIME_S = "data_time_s"
COMM_WAIT_S = "comm_wait_s"
LOSS = "loss"
RSS_MB = "rss_mb"
LAYER_COMM_S = "layer_comm_s"
PEAK_RSS_MB = "peak_rss_mb"
PARAMETERS = "parameters"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
REPLICAS_EQUAL = "replicas_equal"  # one point, at the job's last step
STRAGGLER_RATIO = "straggler_ratio"
WORLD_SIZE = "world_size"
SCALING_EFFICIENCY = "scaling_efficiency"
SAMPLES_PER_SEC_END_TO_END = "samples_per_sec_end_to_end"  # one point, at the job's last step
MEMBERSHIP_EPOCH = "membership_epoch"
MEMBERSHIP_JOINED = "membership_joined"
MEMBERSHIP_LEFT = "membership_left"
MEMBERSHIP_SAMPLES_PER_SEC = "membership_samples_per_sec"
MEMBERSHIP_SCALING_EFFICIENCY = "membership_scaling_efficiency"

RANK_VECTOR: tuple[str, ...] = tuple(k.name for k in RANK_KEYS)
"""Column order of the ``[size, k]`` array the gather returns."""

RANK_KEY_NAMES = frozenset(RANK_VECTOR)
# Per-rank keys that barely change: a point when the value moved (peak RSS by 1 MiB or more, the
# parameter count once), so they do not add to every interval's writes (docs/benchmarks.md).
# System keys are sparse too: NaN in a row means "no new sample" (a rank that samples nothing).
SPARSE_RANK_KEYS = frozenset({PEAK_RSS_MB, PARAMETERS}) | SYSTEM_RANK_KEYS
JOB_KEY_NAMES = frozenset(k.name for k in JOB_KEYS)

# Tags. ``hvdkit.*`` are ours; MLflow's own tags we set are named here too so nothing else
# imports mlflow.utils.mlflow_tags just for a string.
TAG_ROLE = "hvdkit.role"  # parent | rank | sweep
TAG_RANK = "hvdkit.rank"
TAG_LOCAL_RANK = "hvdkit.local_rank"
# Model parallelism (child runs of a job with parallel.model > 1): the rank's position in its
# model-parallel group (which slice it holds) and in its data-parallel group (which copy).
TAG_MODEL_RANK = "hvdkit.model_rank"
TAG_DATA_RANK = "hvdkit.data_rank"
TAG_HOST = "hvdkit.host"  # the host of one rank (child runs)
TAG_HOSTS = "hvdkit.hosts"  # comma-joined unique hosts of all ranks (parent run)
TAG_RECIPE = "hvdkit.recipe"
TAG_FRAMEWORK = "hvdkit.framework"
TAG_BATCH_SIZE = "hvdkit.batch_size"
TAG_HOST_TYPE = "hvdkit.host_type"
TAG_WORLD_SIZE = "hvdkit.world_size"
TAG_JOB_ID = "hvdkit.job_id"
TAG_SPOOL_REF = "hvdkit.spool_ref"  # "<job_id>/<ref>": finds a run created before a crash lost its id
TAG_RANK_SAMPLING = "hvdkit.rank_sampling"  # k when only every k-th rank has a child run
TAG_BASELINE_RUN_ID = "hvdkit.baseline_run_id"  # the np=1 run scaling_efficiency divides by
TAG_RESUMES = "hvdkit.resumes"  # how many times `hvdkit run --resume` continued this job (parent run)
TAG_SYSTEM_METRICS_HOST = "hvdkit.system_metrics_host"  # the host whose system/ metrics this child run holds

# Elastic jobs: the parent says it is one and how often its membership changed; a worker's child
# run says where and when it joined, and (ended KILLED) when it left.
TAG_ELASTIC = "hvdkit.elastic"  # "true" on an elastic job's parent run
TAG_MEMBERSHIP_CHANGES = "hvdkit.membership_changes"  # count, updated at each change (parent)
TAG_WORKER = "hvdkit.worker"  # "<host>[<local rank>]#<process token>" (child runs of elastic jobs)
TAG_JOINED_STEP = "hvdkit.joined_step"
TAG_LEFT_STEP = "hvdkit.left_step"
TAG_LEFT_REASON = "hvdkit.left_reason"  # failure | removed
MEMBERSHIP_ARTIFACT = "elastic/membership.json"  # every membership epoch: steps, ranks, hosts, T, E

# The trained model and its data (a FINISHED job's parent run): the logged model's name, the
# per-rank shard layout (JSON; also on the training dataset input), and MLflow's dataset-context
# input tag, whose values are the splits.
LOGGED_MODEL_NAME = "model"
TAG_SHARD_LAYOUT = "hvdkit.shard_layout"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input tag name (mlflow.log_input's context)
CONTEXT_TRAINING = "training"
CONTEXT_VALIDATION = "validation"
# Seconds rank 0 waits for the model and dataset logging before the job ends without them.
ENV_LOG_MODEL_TIMEOUT_S = "HVDKIT_LOG_MODEL_TIMEOUT_S"

ROLE_PARENT = "parent"
ROLE_RANK = "rank"
ROLE_SWEEP = "sweep"

MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"

# Environment variable through which a launcher passes the job id (the TAG_JOB_ID value) to rank 0.
ENV_JOB_ID = "HVDKIT_JOB_ID"
# Opt-in (=1) to the sqlite bulk metric insert on rank 0 and in ``hvdkit sync``: it bypasses
# MLflow's log_batch, which cannot keep up with ~500 child runs on sqlite (see _sqlfast).
ENV_SQLITE_BULK_METRICS = "HVDKIT_SQLITE_BULK_METRICS"


def describe(scope: Scope | None = None) -> list[MetricKey]:
    """The key table (both scopes, or one), e.g. for ``hvdkit`` docs or a CLI listing."""
    rows = [*RANK_KEYS, *JOB_KEYS]
    return [k for k in rows if scope is None or k.scope == scope]


__all__ = [
    "MAX_GPUS",
    "SYSTEM_KEYS_TABLE",
    "SYSTEM_PREFIX",
    "SYSTEM_RANK_KEYS",
    "SYSTEM_VECTOR",
    "TAG_SYSTEM_METRICS_HOST",
    "TAG_DATA_RANK",
    "TAG_MODEL_RANK",
    "SPARSE_RANK_KEYS",
    "PARAMETERS",
    "PEAK_RSS_MB",
    "LAYER_COMM_S",
    "COMM_WAIT_S",
    "DATA_TIME_S",
    "ENV_JOB_ID",
    "ENV_SQLITE_BULK_METRICS",
    "JOB_KEYS",
    "JOB_KEY_NAMES",
    "LOSS",
    "MEMBERSHIP_ARTIFACT",
    "MEMBERSHIP_EPOCH",
    "MEMBERSHIP_JOINED",
    "MEMBERSHIP_LEFT",
    "MEMBERSHIP_SAMPLES_PER_SEC",
    "MEMBERSHIP_SCALING_EFFICIENCY",
    "MLFLOW_PARENT_RUN_ID",
    "MetricKey",
    "RANK_KEYS",
    "RANK_KEY_NAMES",
    "RANK_VECTOR",
    "ROLE_PARENT",
    "ROLE_RANK",
    "ROLE_SWEEP",
    "RSS_MB",
    "SAMPLES_PER_SEC",
    "SCALING_EFFICIENCY",
    "SAMPLES_PER_SEC_END_TO_END",
    "STEP_TIME_S",
    "STRAGGLER_RATIO",
    "TAG_BASELINE_RUN_ID",
    "TAG_BATCH_SIZE",
    "TAG_ELASTIC",
    "TAG_FRAMEWORK",
    "TAG_HOST",
    "TAG_HOSTS",
    "TAG_HOST_TYPE",
    "TAG_JOB_ID",
    "TAG_JOINED_STEP",
    "TAG_LEFT_REASON",
    "TAG_LEFT_STEP",
    "TAG_LOCAL_RANK",
    "TAG_RANK",
    "TAG_MEMBERSHIP_CHANGES",
    "TAG_RANK_SAMPLING",
    "TAG_RESUMES",
    "TAG_RECIPE",
    "TAG_ROLE",
    "TAG_SPOOL_REF",
    "TAG_WORKER",
    "TAG_WORLD_SIZE",
    "VAL_ACCURACY",
    "VAL_LOSS",
    "WORLD_SIZE",
    "describe",
]
