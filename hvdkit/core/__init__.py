"""Core layer: the framework-free training contract (sharding, LR rule, checkpoints, the loop)."""

from hvdkit._files import atomic_write
from hvdkit.core.checkpoint import CheckpointPolicy
from hvdkit.core.data import ArrayDataset, load_builtin
from hvdkit.core.job import JobFolder
from hvdkit.core.knobs import apply_horovod_knobs
from hvdkit.core.loop import Backend, Summary, plan_steps, print_summary, resume, run_training
from hvdkit.core.lr import LRSchedule
from hvdkit.core.sharding import ShardedBatches, shard_eval

__all__ = [
    "ArrayDataset", "Backend", "CheckpointPolicy", "JobFolder", "LRSchedule", "ShardedBatches", "Summary",
    "apply_horovod_knobs", "atomic_write", "load_builtin", "plan_steps", "print_summary", "resume", "run_training", "shard_eval",
]
