"""``model.fit`` with Horovod on Keras 3: hvdkit's distributed optimizer and callbacks.

Upstream ``horovod.tensorflow.keras`` fails on Keras 3 variables; these are the same pieces
rewritten on the core collectives that do work:

* :func:`DistributedKerasOptimizer` — a Keras optimizer whose ``apply``/``apply_gradients``
  averages the gradients over the ranks first, with the custom loop's
  :class:`~hvdkit.tensorflow._optimizer.GradientAveraging` (one ``hvd.grouped_allreduce``). It runs inside
  Keras' compiled ``train_step`` (TF backend; compile with ``jit_compile=False``).
* :class:`BroadcastGlobalVariablesCallback` — rank 0's model and optimizer state to every rank
  before the first step.
* :class:`MetricAverageCallback` — epoch logs averaged over the ranks.
* :class:`LearningRateWarmupCallback` — the rate of :class:`hvdkit.core.LRSchedule`
  (base → base × size, linearly over the warm-up), set before every step.
* :func:`fit_with_horovod` — the recipe's ``keras_fit`` path: sharded ``tf.data``, the callbacks
  above, evaluation, checkpoints and resume as in :func:`hvdkit.core.run_training`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit._rank import rank_zero
from hvdkit.core import ArrayDataset, CheckpointPolicy, LRSchedule, ShardedBatches, Summary, plan_steps, resume
from hvdkit.core.data import DataSplits
from hvdkit.core.early_stopping import EarlyStopping
from hvdkit.core.job import JobFolder
from hvdkit.core.loop import checkpoint_policy, reduce_summary
from hvdkit.errors import RecipeError
from hvdkit.recipe import Recipe

tf, hvd = require("tensorflow")

import keras  # noqa: E402

from hvdkit.tensorflow._optimizer import (  # noqa: E402
    GradientAveraging,
    broadcast_variables,
    dense_gradients,
)


# -- the optimizer ------------------------------------------------------------------------------
class _DistributedMixin:
    """Placed before a Keras optimizer class in the MRO; see :func:`DistributedKerasOptimizer`."""

    _hvd_averaging: GradientAveraging = GradientAveraging()  # DistributedKerasOptimizer sets its own
    _hvd_passes: int = 1

    def build(self, variables):
        super().build(variables)
        if self._hvd_passes > 1 and not hasattr(self, "_hvd_accumulators"):
            # Local sums of the k micro-batch gradients, and how many are in them. Optimizer
            # variables, so checkpoints and broadcasts carry them like the slots.
            self._hvd_accumulators = [self.add_variable_from_reference(v, name="hvd_accumulator") for v in variables]
            self._hvd_count = self.add_variable((), dtype="int64", initializer="zeros", name="hvd_count")

    def _hvd_apply_averaged(self, grads, variables):
        grads = self._hvd_averaging(grads, variables)  # the one collective of the step, then the decay
        return super().apply(grads, variables)

    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                self.build(variables)  # outside any tf.cond: variables can be created here
        grads = dense_gradients(grads, variables)
        if self._hvd_passes == 1:
            return self._hvd_apply_averaged(grads, variables)
        # backward_passes_per_step = k: accumulate locally, allreduce + update on every k-th call.
        # Every rank counts the same calls, so all take the same branch into the collective.
        index = {id(a): i for i, a in enumerate(self._trainable_variables)}
        accs = [self._hvd_accumulators[index[id(v)]] for v in variables]
        for a, g in zip(accs, grads):
            a.assign_add(tf.cast(g, a.dtype))
        self._hvd_count.assign_add(1)

        def update():
            self._hvd_apply_averaged([tf.convert_to_tensor(a) / self._hvd_passes for a in accs], variables)
            for a in accs:
                a.assign(tf.zeros(a.shape, a.dtype))
            return tf.constant(True)

        tf.cond(tf.equal(self._hvd_count.value % self._hvd_passes, 0), update, lambda: tf.constant(False))


_CLASSES: dict[type, type] = {}


def DistributedKerasOptimizer(
    optimizer: keras.optimizers.Optimizer,
    *,
    compression: str | Any = "none",
    backward_passes_per_step: int = 1,
    weight_decay: float = 0.0,
    process_set: Any = None,
    clip_norm: float | None = None,
    model_set: Any = None,
) -> keras.optimizers.Optimizer:
    """A copy of ``optimizer`` (same class and config) that averages gradients over all ranks.

    ``backward_passes_per_step`` = k: each ``apply`` of one micro-batch's gradient adds it to a
    local accumulator; every k-th call averages the k gradients, allreduces once, and updates.
    ``weight_decay`` adds torch-style coupled L2 (g + λθ) after averaging (0: none).
    ``process_set``: average over these ranks only (a split model's data-parallel set); None: all.
    ``clip_norm``: clip the averaged gradients by global norm (None: no clipping); ``model_set``: a
    split model's group, whose slices' norms make up the unsplit model's.
    Compile the model with ``jit_compile=False``: Horovod's ops have no XLA kernels on CPU.
    """
    if backward_passes_per_step < 1:
        raise ValueError("backward_passes_per_step must be >= 1")
    if isinstance(optimizer, _DistributedMixin):
        raise ValueError("optimizer is already distributed")
    base = type(optimizer)
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Distributed{base.__name__}", (_DistributedMixin, base), {"__module__": __name__})
    dist = cls.from_config(optimizer.get_config())
    dist._hvd_averaging = GradientAveraging(compression, weight_decay, process_set, clip_norm, model_set)
    dist._hvd_passes = int(backward_passes_per_step)
    return dist


# -- callbacks ----------------------------------------------------------------------------------
class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Make every rank start from ``root_rank``'s model and optimizer state.

    Keras builds the optimizer before ``on_train_begin``, so the broadcast normally happens there,
    before any step; should the optimizer still be unbuilt, it happens after the first batch.
    """

    def __init__(self, root_rank: int = 0) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.done = False

    def _broadcast(self) -> None:
        broadcast_variables(self.model.variables, root_rank=self.root_rank)
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and opt.built:
            broadcast_variables(opt.variables, root_rank=self.root_rank)
        self.done = True

    def on_train_begin(self, logs=None) -> None:
        opt = getattr(self.model, "optimizer", None)
        if opt is None or opt.built:
            self._broadcast()

    def on_train_batch_end(self, batch, logs=None) -> None:
        if not self.done:
            self._broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each epoch-end log value by its average over the ranks (one allreduce)."""

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs is None or hvd.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.number, np.ndarray, tf.Tensor)))
        if not keys:
            return
        values = np.array([float(logs[k]) for k in keys], dtype=np.float64)
        averaged = hvd.allreduce(tf.constant(values), op=hvd.Average, name="hvdkit.metric_average").numpy()
        for k, v in zip(keys, averaged):
            logs[k] = float(v)


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Set the optimizer's rate before each step from :class:`hvdkit.core.LRSchedule`.

    The rate rises linearly from ``base_lr`` to ``base_lr × size`` (``rule`` "linear"; "sqrt" and
    "none" as in the schedule) over ``warmup_epochs`` × ``steps_per_epoch`` optimizer steps.
    ``steps_per_epoch`` counts optimizer steps; with ``backward_passes_per_step`` = k, Keras runs
    k batches per step.
    """

    def __init__(self, base_lr: float, warmup_epochs: float = 0.0, steps_per_epoch: int = 1, *,
                 size: int | None = None, rule: str = "linear", backward_passes_per_step: int = 1,
                 verbose: int = 0, schedule: LRSchedule | None = None) -> None:
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.passes = int(backward_passes_per_step)
        # A recipe's whole schedule (decay included) when given; else the warm-up alone, as Horovod's.
        self.schedule = schedule or LRSchedule(base_lr, hvd.size() if size is None else size, rule,
                                               round(warmup_epochs * self.steps_per_epoch))
        self.verbose = verbose
        self._epoch = 0
        self._lr: float | None = None

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None) -> None:
        step = self._epoch * self.steps_per_epoch + batch // self.passes
        lr = self.schedule.at(step)
        if lr != self._lr:
            self.model.optimizer.learning_rate.assign(lr)
            self._lr = lr

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs is not None and self._lr is not None:
            logs["learning_rate"] = float(self._lr)
        if self.verbose and hvd.rank() == 0 and self._lr is not None:
            print(f"epoch {epoch + 1}: learning rate {self._lr:.6g}")


class _Progress(keras.callbacks.Callback):
    """hvdkit's per-step bookkeeping for the fit path: tracker steps, step limit, eval, checkpoints."""

    def __init__(self, backend, recipe: Recipe, tracker, policy: CheckpointPolicy, *, epochs: int,
                 total_steps: int, start_step: int, batch_size: int, passes: int, bar=None) -> None:
        super().__init__()
        self.backend, self.recipe, self.tracker, self.policy = backend, recipe, tracker, policy
        self.epochs, self.total_steps, self.step = epochs, total_steps, start_step
        self.batch_size, self.passes, self.bar = batch_size, passes, bar
        self.samples, self.micro, self.step_time, self.loss = 0, 0, 0.0, math.nan
        self.val_metrics: dict[str, float] = {}
        self.stopper = EarlyStopping.for_recipe(recipe)
        self.stopped_early = False
        self.checkpoint: str | None = None
        self.epochs_done = self._epoch = 0
        self.t_start = self.t_end = time.perf_counter()
        # A split model's seconds in layer collectives, per step, for a tracker that records them.
        self._layer_t = getattr(backend, "layer_comm_s", 0.0)
        self._layer_kw = getattr(backend, "split", False) and _accepts(getattr(tracker, "record_step", None), "layer_comm_s")

    def on_train_begin(self, logs=None) -> None:
        self.t_start = time.perf_counter()
        self._layer_t = getattr(self.backend, "layer_comm_s", 0.0)

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.step_time += time.perf_counter() - self._t0
        self.micro += 1
        if self.micro % self.passes:
            return
        self.step += 1
        self.samples += self.batch_size
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])  # Keras' running mean over the epoch so far
        if self.tracker is not None:
            more = {}
            if self._layer_kw:
                now = self.backend.layer_comm_s
                more["layer_comm_s"], self._layer_t = now - self._layer_t, now
            # comm_wait is inside Keras' compiled step and cannot be separated here: reported as 0.
            self.tracker.record_step(self.step, samples=self.batch_size, step_time_s=self.step_time,
                                     data_time_s=0.0, comm_wait_s=0.0, loss=self.loss, **more)
        self.step_time = 0.0
        if self.bar is not None:
            self.bar.update(1)
            if self.step % self.recipe.log.every_steps == 0:
                self.bar.set_postfix(loss=f"{self.loss:.4f}", epoch=self._epoch + 1)
        if self.step >= self.total_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs is not None and "loss" in logs:
            self.loss = float(logs["loss"])
        last = self.epochs - 1
        if self.recipe.eval.enabled and ((epoch + 1) % self.recipe.eval.every_epochs == 0 or epoch == last
                                         or self.step >= self.total_steps):
            self.val_metrics = self.backend.evaluate()  # exact, sample-weighted over all ranks
            if logs is not None:
                logs.update(self.val_metrics)
            if self.tracker is not None:
                self.tracker.log_metrics(self.val_metrics, self.step)
            if self.stopper is not None and epoch < last and self.step < self.total_steps:
                self.stopped_early = self.stopper.decide(self.backend.rank, self.backend.broadcast_object, self.val_metrics)
                if self.stopped_early:
                    self.model.stop_training = True
                    rank_zero(self.backend.rank, print, f"hvdkit: {self.stopper.reason()}; stopped after epoch "
                              f"{epoch + 1} of {self.epochs}", file=sys.stderr, flush=True)
        done = self.step >= self.total_steps or self.stopped_early
        if self.policy.due(epoch, epoch if done else last):
            self.backend.prepare_checkpoint()  # a split model's gather (every rank); a no-op otherwise
            meta = {"epoch": epoch, "step": self.step, "recipe": self.recipe.name}
            self.checkpoint = rank_zero(self.backend.rank, lambda: str(self.policy.save(self.backend, epoch, meta)),
                                        default=self.checkpoint)
        self.epochs_done = epoch + 1

    def on_train_end(self, logs=None) -> None:
        self.t_end = time.perf_counter()


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def sharded_dataset(data: ArrayDataset, batches: ShardedBatches, epochs: Sequence[int], batch_size: int,
                    num_batches: int | None = None, threads: int | None = 1) -> "tf.data.Dataset":
    """This rank's batches for ``epochs``, in the order :class:`ShardedBatches` gives the custom loop."""
    idx = np.concatenate([batches.rank_indices(e) for e in epochs]) if len(epochs) else np.empty(0, np.int64)
    if num_batches is not None:
        idx = idx[: num_batches * batch_size]
    x, y = tf.constant(data.x_train), tf.constant(data.y_train)
    ds = tf.data.Dataset.from_tensor_slices(idx).batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda i: (tf.gather(x, i), tf.gather(y, i))).prefetch(1)
    opts = tf.data.Options()
    if threads:
        opts.threading.private_threadpool_size = threads
        opts.threading.max_intra_op_parallelism = 1
    return ds.with_options(opts)


def fit_with_horovod(
    backend_or_model: Any,
    recipe: Recipe,
    data: ArrayDataset | DataSplits,
    *,
    tracker: Any = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    progress: Callable[[int, int], Any] | None = None,
    job: JobFolder | None = None,
) -> Summary:
    """Train with ``model.fit`` on every rank; the recipe's ``keras_fit`` path.

    ``backend_or_model``: a :class:`TensorFlowBackend` or a Keras model (a backend is built around
    it). Each rank fits on its :class:`ShardedBatches` shard; gradients are averaged by
    :func:`DistributedKerasOptimizer`; rank 0's state is broadcast first; the rate follows the
    recipe's schedule; evaluation, checkpoints (rank 0) and resume behave as in ``run_training``.
    Returns the same :class:`Summary`.
    """
    from hvdkit.tensorflow._backend import TensorFlowBackend

    if isinstance(backend_or_model, TensorFlowBackend):
        backend = backend_or_model
    else:
        backend = TensorFlowBackend(recipe.model_copy(update={"keras_fit": True}), data, backend_or_model)
    backend.prepare_fit()
    rank, size = backend.rank, backend.size
    passes = recipe.horovod.backward_passes_per_step
    if recipe.batch_size % passes:
        raise RecipeError(f"batch_size {recipe.batch_size} is not a multiple of backward_passes_per_step {passes}",
                          fix="with keras_fit each Keras batch is one micro-batch: make batch_size divisible")
    # Shards per model copy: the members of a split model's group train on the same batches.
    data_rank, data_size = getattr(backend, "data_rank", rank), getattr(backend, "data_size", size)
    feed = backend.train_feed(recipe, data_rank, data_size)  # None: the in-memory arrays
    batches = feed or ShardedBatches(len(data.x_train), recipe.batch_size, data_rank, data_size, recipe.seed,
                                     pad=recipe.data.uneven == "pad")
    epochs, total_steps = plan_steps(recipe, batches.steps_per_epoch)
    policy, job = checkpoint_policy(recipe, job, backend.checkpoint_ext)
    summary = Summary()

    resumed, start_epoch, step = resume(backend, policy, job, summary)
    split = getattr(backend, "split", False)
    if split:  # slices from their data-parallel set, a resumed rank 0's unsplit state split on every rank
        backend.broadcast_state(resumed)

    bar = progress(total_steps, step) if progress else None
    micro_batch = recipe.batch_size // passes
    if feed is not None:
        ds = feed.fit_dataset(range(start_epoch, epochs), micro_batch, max(0, total_steps - step) * passes)
    else:
        ds = sharded_dataset(data, batches, range(start_epoch, epochs), micro_batch,
                             max(0, total_steps - step) * passes, recipe.threads)
    tracked = _Progress(backend, recipe, tracker, policy, epochs=epochs, total_steps=total_steps, start_step=step,
                        batch_size=recipe.batch_size, passes=passes, bar=bar)
    cbs = [
        # Also carries a resumed rank 0's state to every rank (a split model: broadcast_state above).
        *([] if split else [BroadcastGlobalVariablesCallback(0)]),
        # The rate scales with the model copies (the global batch is batch_size × data_size).
        LearningRateWarmupCallback(recipe.optimizer.lr, recipe.lr_schedule.warmup_epochs, batches.steps_per_epoch,
                                   size=data_size, rule=recipe.lr_schedule.scale, backward_passes_per_step=passes,
                                   schedule=LRSchedule.for_recipe(recipe, data_size, batches.steps_per_epoch, total_steps)),
        MetricAverageCallback(),
        tracked,
        *callbacks,
    ]
    if start_epoch < epochs and step < total_steps:
        backend.model.fit(ds, epochs=epochs, initial_epoch=start_epoch, steps_per_epoch=batches.steps_per_epoch * passes,
                          callbacks=cbs, shuffle=False, verbose=verbose if rank == 0 else 0)
    if bar is not None:
        bar.close()

    elapsed = tracked.t_end - tracked.t_start if tracked.samples else 0.0
    reduce_summary(backend, summary, tracked.samples, elapsed, tracked.loss)
    summary.val_metrics = tracked.val_metrics
    summary.epochs = max(tracked.epochs_done, start_epoch)
    summary.steps, summary.seconds = tracked.step, elapsed
    summary.checkpoint = tracked.checkpoint
    summary.stopped_early = tracked.stopped_early
    return summary
