"""Elastic training: the loop that ``hvd.elastic.run`` re-enters after every membership change.
Framework-free: the framework layers (``hvdkit.torch._elastic``, ``hvdkit.tensorflow._elastic``)
hand it an :class:`ElasticSupport` next to their :class:`~hvdkit.core.loop.Backend`.

Why a loop of its own rather than :func:`~hvdkit.core.loop.run_training`: an elastic job's
position is not "epoch e, step k of a fixed cut" but *samples already taken from this epoch's
permutation*, because the global batch (``batch_size`` × world size) changes with the world. At
world size p each step takes the next p·b samples of the epoch's permutation, rank r the r-th
slice: exactly the batches :class:`~hvdkit.core.sharding.ShardedBatches` gives while p stays
fixed; after a change the rest of the epoch is cut for the new world (the incomplete last
global batch is dropped, as there). The learning rate is the recipe's rule at the current size.

Horovod's contract, and how this loop keeps it:

* Every rank commits at the same steps (``commit_every``, counted identically everywhere). A
  commit saves model, optimizer and progress in memory and asks rank 0 whether hosts changed
  (a broadcast): every rank then raises ``HostsUpdatedInterrupt`` together.
* After a failure (``HorovodInternalError``: a peer died in a collective) the state is rolled
  back to the last commit, so up to ``commit_every`` steps are trained again.
* Nothing collective runs outside the wrapped function: a worker that joins runs ``state.sync()``
  and then ``on_membership`` exactly where the survivors do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from hvdkit._rank import rank_zero
from hvdkit.core.data import ArrayDataset
from hvdkit.core.loop import Backend, Summary, checkpoint_policy, reduce_summary
from hvdkit.core.lr import LRSchedule
from hvdkit.recipe import Recipe

# Why the last (re)entry happened, as ElasticSupport.reason reports it.
START, FAILURE, HOSTS_UPDATED = "start", "failure", "hosts_updated"


class ElasticSupport(Protocol):
    """What a framework layer adds to its backend for elastic training (all on every rank)."""

    reason: str  # why the wrapped function was last (re)entered: START, FAILURE or HOSTS_UPDATED

    def state(self, **progress: Any) -> Any:
        """A ``horovod.common.elastic.State`` holding the model, the optimizer and ``progress``
        (plain attributes: ``state.step`` ...); ``sync()`` broadcasts all of it from rank 0."""

    def run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``hvd.elastic.run`` for this framework, recording ``reason`` before each reset."""

    def on_reset(self) -> None:
        """At each (re)entry, after the sync: refresh the backend's rank and size and whatever
        depends on them (evaluation shard), and drop collectives a failure left pending."""

    def is_hosts_updated(self, exc: BaseException) -> bool:
        """Is ``exc`` Horovod's ``HostsUpdatedInterrupt`` (raised by a commit on every rank)?"""


def recording_reason(support: Any, fn: Callable[[Any], Any], failure: type[BaseException],
                     hosts_updated: type[BaseException],
                     call: Callable[[Callable[[], Any]], Any] = lambda f: f()) -> Callable[[Any], Any]:
    """``fn`` as the framework layers hand it to ``hvd.elastic.run``: leaving by ``failure``
    (Horovod's HorovodInternalError) or ``hosts_updated`` (HostsUpdatedInterrupt) first notes why
    on ``support.reason``, for the membership bookkeeping at the next entry. ``call`` runs it
    (TensorFlow converts its op errors there)."""

    def body(state: Any) -> Any:
        try:
            return call(lambda: fn(state))
        except failure:
            support.reason = FAILURE
            raise
        except hosts_updated:
            support.reason = HOSTS_UPDATED
            raise

    return body


def epoch_batches(num_samples: int, batch_size: int, rank: int, size: int, seed: int, epoch: int,
                  offset: int) -> Iterator[np.ndarray]:
    """This rank's batches of ``epoch`` from sample ``offset`` of its permutation on, at world
    ``size``. With ``offset`` = k·b·size this is ShardedBatches.epoch from step k."""
    perm = np.random.default_rng((seed, epoch)).permutation(num_samples)
    global_batch = batch_size * size
    lo = offset + rank * batch_size
    while offset + global_batch <= num_samples:
        yield perm[lo : lo + batch_size]
        offset += global_batch
        lo += global_batch


def steps_per_epoch(num_samples: int, batch_size: int, size: int) -> int:
    return num_samples // (batch_size * size)


def _load_latest(policy, backend, summary: Summary) -> tuple[int, int]:
    """Rank 0 of a resumed job: load the newest checkpoint; the (epoch, step) to continue from."""
    latest = policy.latest()
    if latest is None:
        return 0, 0
    meta = backend.load_checkpoint(latest)
    summary.resumed_from = str(latest)
    return meta["epoch"] + 1, meta["step"]


def _show_progress(bar_box: list, progress: Callable[[int, int], Any], total: int, step: int) -> None:
    """Rank 0's progress bar: made on the first entry, its total updated on a re-entry (the world changed)."""
    if not bar_box:
        bar_box.append(progress(total, step))
    else:
        bar_box[0].total = total
        bar_box[0].refresh()


def run_elastic_training(
    backend: Backend,
    support: ElasticSupport,
    recipe: Recipe,
    data: ArrayDataset,
    tracker: Any,
    *,
    on_membership: Callable[[int, str], None] | None = None,
    before_hosts_reset: Callable[[], None] | None = None,
    on_finish: Callable[[int], None] | None = None,
    commit_every: int = 10,
    progress: Callable[[int, int], Any] | None = None,
    job: Callable[[], Any] | None = None,
) -> Summary:
    """Train ``recipe`` elastically. Every rank calls, inside the wrapped function:
    ``on_membership(step, reason)`` at every (re)entry, after the state sync (the tracker's
    membership bookkeeping, a collective); ``before_hosts_reset()`` when a commit found changed
    hosts, while the old world still stands (the tracker gathers its last interval);
    ``on_finish(step)`` once training is done (the tracker's last gather). ``job()``: the job
    folder as known now (rank 0 knows it from the start; checkpoints are rank 0's). Returns
    rank-local :class:`Summary` fields like :func:`run_training` (``samples_per_sec``: the last
    membership's measured sum)."""
    if commit_every < 1:
        raise ValueError("commit_every must be >= 1")
    n, b = len(data.x_train), recipe.batch_size
    current_job = job or (lambda: None)
    policy, first_job = checkpoint_policy(recipe, current_job(), backend.checkpoint_ext)
    summary = Summary()
    # A resumed job (hvdkit run --resume): rank 0 loads before the first sync, which then
    # broadcasts model, optimizer and position to every rank (no collective out here).
    epoch0, step0 = rank_zero(backend.rank, _load_latest, policy, backend, summary, default=(0, 0)) \
        if first_job.resumed else (0, 0)
    state = support.state(epoch=epoch0, step=step0, offset=0, done=False)
    t_job = time.perf_counter()
    bar_box: list[Any] = []
    # This process's samples and time since its last (re)entry: the final summary's measured rate.
    clock = {"t0": time.perf_counter(), "samples": 0, "loss": math.nan}

    def finished() -> bool:
        return state.done or (recipe.steps is not None and state.step >= recipe.steps) or \
            (recipe.steps is None and state.epoch >= (recipe.epochs or 1))

    def commit() -> None:
        try:
            state.commit()
        except BaseException as exc:
            if before_hosts_reset is not None and support.is_hosts_updated(exc):
                before_hosts_reset()  # every rank raised it, after the same broadcast
            raise

    def train(state: Any) -> Summary:
        support.on_reset()
        rank, size = backend.rank, backend.size
        if on_membership is not None:
            on_membership(state.step, support.reason)
        clock.update(t0=time.perf_counter(), samples=0)
        policy, _ = checkpoint_policy(recipe, current_job(), backend.checkpoint_ext)  # rank 0 may have changed
        spe = steps_per_epoch(n, b, size)
        if spe == 0:
            from hvdkit.errors import RecipeError

            raise RecipeError(f"batch_size {b} × {size} ranks exceeds the {n} training samples",
                              fix="lower batch_size or --max-np")
        total = recipe.steps or (recipe.epochs or 1) * spe  # at this size: the progress bar's estimate
        schedule = LRSchedule.for_recipe(recipe, size, spe, total)
        if progress is not None:
            rank_zero(rank, _show_progress, bar_box, progress, total, state.step)
        bar = rank_zero(rank, lambda: bar_box[0] if bar_box else None)
        while not finished():
            epoch = state.epoch
            for idx in epoch_batches(n, b, rank, size, recipe.seed, epoch, state.offset):
                t0 = time.perf_counter()
                batch = backend.batch(idx)
                t1 = time.perf_counter()
                loss, comm_wait = backend.train_step(batch, schedule.at(state.step))
                t2 = time.perf_counter()
                state.step += 1
                state.offset += b * size
                clock["samples"] += len(idx)
                clock["loss"] = loss
                tracker.record_step(state.step, samples=len(idx), step_time_s=t2 - t1, data_time_s=t1 - t0,
                                    comm_wait_s=comm_wait, loss=loss)
                if bar is not None:
                    bar.update(1)
                    if state.step % recipe.log.every_steps == 0:
                        bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1, np=size)
                if recipe.steps is not None and state.step >= recipe.steps:
                    break
                if state.step % commit_every == 0:
                    commit()
            last_epoch = finished() or epoch == (recipe.epochs or 1) - 1 and recipe.steps is None
            epoch_done = recipe.steps is None or state.offset + b * size > n
            if recipe.eval.enabled and (last_epoch or (epoch_done and (epoch + 1) % recipe.eval.every_epochs == 0)):
                summary.val_metrics = backend.evaluate()
                tracker.log_metrics(summary.val_metrics, state.step)
            if policy.enabled and (last_epoch or (epoch_done and policy.due(epoch, -1))):
                meta = {"epoch": epoch, "step": state.step, "recipe": recipe.name}
                summary.checkpoint = rank_zero(rank, lambda: str(policy.save(backend, epoch, meta)),
                                               default=summary.checkpoint)
            if epoch_done:
                state.epoch, state.offset = epoch + 1, 0
                summary.epochs = state.epoch
            if last_epoch:
                state.done = True
            commit()  # the epoch's end (or the job's): a reset from here on never repeats it
        if bar is not None:
            bar.close()
            bar_box.clear()
        if on_finish is not None:
            on_finish(state.step)
        reduce_summary(backend, summary, clock["samples"], time.perf_counter() - clock["t0"], clock["loss"])
        summary.steps = state.step
        summary.epochs = max(summary.epochs, state.epoch)
        summary.seconds = time.perf_counter() - t_job
        return summary

    return support.run(train)(state)


__all__ = ["FAILURE", "HOSTS_UPDATED", "START", "ElasticSupport", "epoch_batches", "recording_reason", "run_elastic_training", "steps_per_epoch"]
