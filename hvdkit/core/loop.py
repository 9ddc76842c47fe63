"""The training loop, written once for every framework and handed a backend.

Like Horovod's ``_keras/callbacks.py``: the framework layers (``hvdkit.torch``,
``hvdkit.tensorflow``) implement :class:`Backend`; the schedule (epochs, LR warm-up, evaluation,
checkpoints, logging, progress, summary) lives here and so behaves the same on both.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hvdkit._rank import from_rank_zero, rank_zero
from hvdkit.core.checkpoint import CheckpointPolicy
from hvdkit.core.data import ArrayDataset, DataSplits
from hvdkit.core.early_stopping import EarlyStopping
from hvdkit.core.feed import Feed, IndexFeed
from hvdkit.core.job import JobFolder
from hvdkit.core.lr import LRSchedule
from hvdkit.core.sharding import ShardedBatches
from hvdkit.recipe import Recipe


class Backend(Protocol):
    """What a framework layer gives the loop. All methods are called on every rank unless noted."""

    rank: int
    size: int
    checkpoint_ext: str
    # The accelerator this rank trains on, by name (e.g. "NVIDIA H100 80GB HBM3"), or None on
    # the CPU: the framework layer knows it, tracking records it (host type, config).
    accelerator: str | None

    def batch(self, indices: np.ndarray) -> Any:
        """This rank's batch for ``indices`` (into the training arrays), ready for ``train_step``.
        Optional ``train_feed(recipe, data_rank, data_size)``: the backend's own :class:`Feed` for
        streamed data (a shard folder, a framework's pipeline), None for the arrays."""

    def train_step(self, batch: Any, lr: float) -> tuple[float, float]:
        """One optimizer step with averaged gradients; returns (this rank's loss, seconds blocked on averaging)."""

    def evaluate(self) -> dict[str, float]:
        """Validation metrics averaged over all ranks (a collective)."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (a collective)."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective)."""

    def broadcast_state(self, resumed: bool) -> None:
        """Make every rank's model (and, when ``resumed``, optimizer) state equal to rank 0's (a collective)."""

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        """Rank 0 only: write model + optimizer + ``meta`` to ``path`` (the loop makes it atomic)."""

    def load_checkpoint(self, path: Path) -> dict:
        """Rank 0 only: restore model + optimizer from ``path``; return its ``meta``."""


class Tracker(Protocol):
    def record_step(self, step: int, *, samples: int, step_time_s: float, data_time_s: float, comm_wait_s: float, loss: float) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


@dataclass
class Summary:
    epochs: int = 0
    steps: int = 0
    loss: float = math.nan
    val_metrics: dict[str, float] = field(default_factory=dict)
    # Two throughputs, both summed over the ranks' own rates (never rank 0's x N). End to end:
    # samples / wall seconds of training, evaluation and checkpoints included (MLflow:
    # samples_per_sec_end_to_end). Training steps: samples / (step + data time), which is what the
    # parent run's samples_per_sec holds; train.py replaces the loop's whole-job figure with the
    # tracker's (the mean of the logged intervals, as efficiency.history_throughput takes it).
    samples_per_sec: float = math.nan
    samples_per_sec_steps: float = math.nan
    seconds: float = 0.0
    resumed_from: str | None = None
    checkpoint: str | None = None
    stopped_early: bool = False  # early_stopping ended training before its last epoch
    replicas_equal: bool | None = None  # every replica's parameters equal after training (replicas_agree)


def plan_steps(recipe: Recipe, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, total optimizer steps) for the recipe."""
    if recipe.steps:
        return math.ceil(recipe.steps / steps_per_epoch), recipe.steps
    return recipe.epochs or 1, (recipe.epochs or 1) * steps_per_epoch


def checkpoint_policy(recipe: Recipe, job: JobFolder | None, ext: str) -> tuple[CheckpointPolicy, JobFolder]:
    """Checkpoints go to the job's own folder (``<checkpoint.dir>/<job id>/``). Library callers
    that pass no job write to ``checkpoint.dir`` itself, as a fresh job (never resumed)."""
    job = job or JobFolder.at(recipe.checkpoint.dir)
    return CheckpointPolicy(job.dir, recipe.checkpoint.every_epochs, ext, on_saved=job.record_checkpoint), job


def resume(backend: Backend, policy: CheckpointPolicy, job: JobFolder, summary: Summary) -> tuple[bool, int, int]:
    """Only a resumed job continues: rank 0 reads its newest checkpoint; broadcasts tell every rank
    whether and where to resume. A new job never inherits an earlier job's state.

    Returns (resumed, first epoch to run, optimizer steps already done). The caller still
    broadcasts the model/optimizer state itself (``broadcast_state`` or a Keras callback).
    """
    rank = backend.rank
    latest = rank_zero(rank, policy.latest) if job.resumed else None
    if not from_rank_zero(rank, backend.broadcast_object, lambda: latest is not None):
        return False, 0, 0
    meta = from_rank_zero(rank, backend.broadcast_object, backend.load_checkpoint, latest)
    summary.resumed_from = rank_zero(rank, str, latest)
    return True, meta["epoch"] + 1, meta["step"]


def run_training(
    backend: Backend,
    recipe: Recipe,
    data: ArrayDataset | DataSplits,
    tracker: Tracker,
    *,
    progress: Callable[[int, int], Any] | None = None,
    after_step: Callable[[int], None] | None = None,
    job: JobFolder | None = None,
) -> Summary:
    rank, size = backend.rank, backend.size
    # A split model (parallel.model > 1): the members of a model group train on the same batch;
    # the batches are sharded over the model copies, and the LR scales with their number.
    data_rank, data_size = data_shard(backend)
    batches = train_feed(backend, recipe, data, data_rank, data_size)
    epochs, total_steps = plan_steps(recipe, batches.steps_per_epoch)
    schedule = LRSchedule.for_recipe(recipe, data_size, batches.steps_per_epoch, total_steps)
    policy, job = checkpoint_policy(recipe, job, backend.checkpoint_ext)
    summary = Summary()
    stopper = EarlyStopping.for_recipe(recipe)

    resumed, start_epoch, step = resume(backend, policy, job, summary)
    # Broadcast initial state from rank 0 so all replicas start identical (random init or resumed).
    backend.broadcast_state(resumed)

    layer_kw = _accepts(tracker.record_step, "layer_comm_s")
    layer_t = getattr(backend, "layer_comm_s", 0.0)
    bar = progress(total_steps, step) if progress else None
    t_train, samples_done, loss, busy = time.perf_counter(), 0, math.nan, 0.0
    for epoch in range(start_epoch, epochs):
        it = batches.epoch(epoch)
        while step < total_steps:
            t0 = time.perf_counter()
            batch, n = next(it, (None, 0))
            if batch is None:
                break
            t1 = time.perf_counter()
            loss, comm_wait = backend.train_step(batch, schedule.at(step))
            t2 = time.perf_counter()
            step += 1
            samples_done += n
            busy += t2 - t0
            more = {}
            if layer_kw:
                now = getattr(backend, "layer_comm_s", 0.0)
                more["layer_comm_s"], layer_t = now - layer_t, now
            tracker.record_step(step, samples=n, step_time_s=t2 - t1, data_time_s=t1 - t0, comm_wait_s=comm_wait, loss=loss,
                                **more)
            if bar is not None:
                bar.update(1)
                if step % recipe.log.every_steps == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
            if after_step:
                after_step(step)
        if hasattr(it, "close"):
            it.close()  # a read-ahead thread stops here when a step budget ends the epoch early
        if recipe.eval.enabled and ((epoch + 1) % recipe.eval.every_epochs == 0 or epoch == epochs - 1):
            summary.val_metrics = backend.evaluate()
            tracker.log_metrics(summary.val_metrics, step)
            if stopper is not None and epoch < epochs - 1:
                summary.stopped_early = stopper.decide(rank, backend.broadcast_object, summary.val_metrics)
        if policy.due(epoch, epoch if summary.stopped_early else epochs - 1):  # a stop is the last epoch
            meta = {"epoch": epoch, "step": step, "recipe": recipe.name}
            prepare_checkpoint(backend)
            summary.checkpoint = rank_zero(rank, lambda: str(policy.save(backend, epoch, meta)), default=summary.checkpoint)
        summary.epochs = epoch + 1
        if summary.stopped_early:
            rank_zero(rank, print, f"hvdkit: {stopper.reason()}; stopped after epoch {epoch + 1} of {epochs}",
                      file=sys.stderr, flush=True)
            break
        if step >= total_steps:
            break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_train
    reduce_summary(backend, summary, samples_done, elapsed, loss, busy_s=busy)
    summary.steps, summary.seconds = step, elapsed
    return summary


def train_feed(backend: Backend, recipe: Recipe, data: Any, data_rank: int, data_size: int) -> Feed:
    """This rank's batches: the backend's own feed (files, a framework's pipeline) when it has
    one, else index arrays into the training arrays, each cut by ``backend.batch``."""
    own = getattr(backend, "train_feed", None)
    feed = own(recipe, data_rank, data_size) if own is not None else None
    if feed is not None:
        return feed
    sharding = ShardedBatches(len(data.x_train), recipe.batch_size, data_rank, data_size, recipe.seed,
                              pad=recipe.data.uneven == "pad")
    return IndexFeed(sharding, backend.batch)


def data_shard(backend: Backend) -> tuple[int, int]:
    """(this rank's model copy, number of copies): (rank, size) unless the backend splits its model."""
    layout = getattr(backend, "layout", None)
    if layout is None or layout.model == 1:
        return backend.rank, backend.size
    return layout.data_rank(backend.rank), layout.data


def prepare_checkpoint(backend: Backend) -> None:
    """Every rank, before rank 0 saves: a backend with a split model gathers the unsplit state (a
    collective). Optional: a backend without ``prepare_checkpoint`` (TensorFlow, for now) skips it."""
    prepare = getattr(backend, "prepare_checkpoint", None)
    if prepare is not None:
        prepare()


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def replicas_agree(backend: Backend) -> bool:
    """After training, every rank's model equals its replicas' (a collective): the float64 sum and
    sum of squares of each rank's parameters, gathered, must be the same bit for bit among the
    ranks holding the same slice (all ranks, unless the model is split). Data parallelism rests on
    it, and bf16, clipping or a custom step could break it silently. Backends without
    ``replica_digest`` are taken on trust (True)."""
    digest = getattr(backend, "replica_digest", None)
    if digest is None:
        return True
    table = backend.gather(np.asarray(digest(), dtype=np.float64))
    layout = getattr(backend, "layout", None)
    groups = layout.data_groups() if layout is not None and layout.model > 1 else [list(range(backend.size))]
    return all(np.array_equal(table[g[0]], table[r]) for g in groups for r in g)


def reduce_summary(backend: Backend, summary: Summary, samples: int, elapsed: float, loss: float,
                   busy_s: float | None = None) -> Summary:
    """The closing numbers, computed the same way by every training path (the loop, the elastic
    loop, Keras ``fit``); a collective. Throughput is measured: each rank's own rate, summed (not
    rank 0's rate × N). The loss is the ranks' mean of their last one; NaN when this rank trained
    nothing (resumed at the end) or its loss is not finite. ``busy_s``: this rank's step + data
    time, for the training-steps throughput (NaN when a path does not measure it)."""
    rate = samples / elapsed if elapsed > 0 else 0.0
    steps_rate = samples / busy_s if busy_s else 0.0
    layout = getattr(backend, "layout", None)
    if layout is not None and layout.model > 1:
        # a model group's members train on the same samples: count them once
        rate /= layout.model
        steps_rate /= layout.model
    finite = bool(samples) and math.isfinite(loss)
    totals = backend.allreduce_sum(np.array([rate, loss if finite else 0.0, steps_rate], dtype=np.float64))
    summary.samples_per_sec = float(totals[0])
    summary.loss = float(totals[1] / backend.size) if finite else math.nan
    summary.samples_per_sec_steps = float(totals[2]) if busy_s is not None else math.nan
    return summary


def print_summary(summary: Summary, recipe: Recipe, size: int, file=None) -> None:
    """Rank 0's closing table."""
    from rich.console import Console
    from rich.table import Table

    from hvdkit.tracking import keys

    table = Table(title=f"hvdkit · {recipe.name} · {recipe.framework} · np={size}")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)  # paths must stay copy-pasteable
    rows = [("epochs", str(summary.epochs)), ("steps", str(summary.steps)), ("train loss", f"{summary.loss:.4f}")]
    rows += [(k, f"{v:.4f}") for k, v in summary.val_metrics.items()]
    # Named as in MLflow, so the console and the parent run can be compared number for number.
    rows += [(f"samples/s, training steps ({keys.SAMPLES_PER_SEC})", _rate(summary.samples_per_sec_steps)),
             (f"samples/s, end to end ({keys.SAMPLES_PER_SEC_END_TO_END})", _rate(summary.samples_per_sec)),
             ("time (s)", f"{summary.seconds:.1f}")]
    if summary.stopped_early:
        rows.append(("stopped early", f"after epoch {summary.epochs}"))
    if summary.resumed_from:
        rows.append(("resumed from", summary.resumed_from))
    if summary.checkpoint:
        rows.append(("checkpoint", summary.checkpoint))
    for r in rows:
        table.add_row(*r)
    Console(file=file or sys.stdout, width=240).print(table)


def _rate(value: float) -> str:
    return f"{value:,.1f}" if math.isfinite(value) else "-"
