"""The TensorFlow/Keras 3 backend of the shared loop, on Horovod's core collectives.

``horovod.tensorflow.keras`` and ``DistributedGradientTape`` do not support Keras 3, so the
averaging (:mod:`._optimizer`), the broadcasts and the ``model.fit`` integration (:mod:`._keras`)
are hvdkit's own, built on ``grouped_allreduce``, ``broadcast_variables``, ``allreduce``,
``allgather`` and ``broadcast_object``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit.core import ArrayDataset, apply_horovod_knobs, atomic_write, shard_eval
from hvdkit.core.data import DataSplits
from hvdkit.core._layout import ParallelLayout
from hvdkit.errors import ParallelError
from hvdkit.recipe import Recipe

tf, hvd = require("tensorflow")

import keras  # noqa: E402

from hvdkit.tensorflow import _data, _models, _optimizer  # noqa: E402
from hvdkit.tensorflow import _tensor_parallel as tp  # noqa: E402
from hvdkit.tensorflow._accelerator import accelerator_name  # noqa: E402

_EVAL_BATCH = 512  # bounds evaluation memory on large validation shards


def set_precision(recipe: Recipe) -> None:
    """Keras' dtype policy for the recipe's ``precision``, set before any model is built (a Python
    recipe's too: hvdkit.train calls this first). bf16: layers compute in bfloat16, variables,
    gradients and their allreduce stay float32 ("mixed_bfloat16")."""
    if recipe.precision in ("bf16", "fp16"):
        keras.mixed_precision.set_global_policy({"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[recipe.precision])


def sparse_ce(labels, logits):
    """Cross-entropy from logits, mean over the batch (torch's CrossEntropyLoss); in float32
    whatever the logits' dtype (bf16 models)."""
    logits = tf.cast(logits, tf.float32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def training_loss(label_smoothing: float = 0.0):
    """The training loss for integer labels: :func:`sparse_ce`, or with label smoothing ε the
    cross-entropy against (1 − ε)·onehot + ε/K, torch's ``CrossEntropyLoss(label_smoothing=ε)``."""
    if not label_smoothing:
        return sparse_ce
    eps = float(label_smoothing)

    def smoothed_ce(labels, logits):
        logits = tf.cast(logits, tf.float32)
        k = tf.shape(logits)[-1]
        target = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), k, dtype=logits.dtype)
        target = target * (1.0 - eps) + eps / tf.cast(k, logits.dtype)
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits))

    return smoothed_ce


class TensorFlowBackend:
    checkpoint_ext = "npz"

    def __init__(self, recipe: Recipe, data: ArrayDataset | DataSplits, model: "keras.Model | None" = None) -> None:
        _optimizer.configure_threads(recipe.threads)  # before any TF op runs
        set_precision(recipe)  # before the built-in model is built
        apply_horovod_knobs(recipe)  # the recipe's cycle time / fusion threshold, unless set
        split = self.split = recipe.parallel.model > 1
        self.model_set = self.data_set = None
        if split:
            if os.environ.get("HOROVOD_ELASTIC") == "1":
                raise ParallelError(f"parallel.model={recipe.parallel.model} in an elastic job",
                                    fix="run without elastic options, or set parallel.model=1")
            if model is not None and not callable_factory(model):
                raise ParallelError(f"parallel.model={recipe.parallel.model}: this Python recipe's build_model takes no "
                                    "`parallel` argument, so its model cannot be split",
                                    fix="give build_model a parallel=None parameter and build with "
                                        "ColumnParallelDense/RowParallelDense(parallel.model_set), or set parallel.model=1")
            if model is None and recipe.model.name != "mlp":
                raise ParallelError(f"parallel.model={recipe.parallel.model}: model {recipe.model.name!r} cannot be split",
                                    fix="use model.name=mlp, or parallel.model=1")
            # Horovod 0.28 registers process sets in hvd.init only: the layout needs the job's
            # size before init, from the launcher's environment.
            self.layout = ParallelLayout(_launcher_size(), recipe.parallel.model)
            self.model_set, self.data_set = tp.make_process_sets(self.layout)  # calls hvd.init(process_sets=...)
        else:
            hvd.init()  # joins the job horovodrun started (Gloo or MPI)
        self.rank, self.size = hvd.rank(), hvd.size()
        if not split:
            self.layout = ParallelLayout(self.size, 1)
        # Members of a model group see the same samples: data shards are per model copy.
        self.data_rank, self.data_size = self.layout.data_rank(self.rank), self.layout.data
        # The GPU this rank sees (its name), or None on the CPU: reported to tracking.
        self.accelerator: str | None = accelerator_name(hvd.local_rank())
        keras.utils.set_random_seed(recipe.seed)
        self.recipe, self.data = recipe, data
        self.streamed = isinstance(data, DataSplits)  # a shard folder or the recipe's own tf.data pipeline
        if self.streamed:
            self.x = self.y = self.x_val = self.y_val = None
        else:
            # Arrays stay numpy (channel-last already); a batch is one fancy index + one conversion.
            self.x, self.y = data.x_train, data.y_train
            # Each model copy evaluates its slice (a split model's forward pass is a collective of its
            # group, whose members must see the same inputs); the global sums then count every sample
            # `model` times, which the loss and accuracy ratios do not see.
            val = shard_eval(len(data.x_val), self.data_rank, self.data_size)
            self.x_val, self.y_val = data.x_val[val], data.y_val[val]
        if split and model is not None:
            # A Python recipe's own split model: built now that its process sets exist.
            self.model = model(tp.ParallelContext(self.layout, self.model_set, self.data_set, self.rank))
        elif split:
            # Same seed on every rank: replicated variables agree, slices are offset by member.
            self.model = tp.TensorParallelMLP(int(np.prod(data.input_shape)), list(recipe.model.hidden), data.num_classes,
                                              self.model_set, flatten=True, name="mlp")
        else:
            self.model = model if model is not None else _models.build(recipe.model, data.input_shape, data.num_classes)
        self._full_state: dict | None = None  # a split model's gathered checkpoint state (prepare/load)
        self._batch_checked = False  # split: the first batch is checked to be the same in a model group
        one = tf.zeros((1, *data.input_shape)) if self.streamed else tf.convert_to_tensor(self.x[:1])
        self.model(one, training=False)  # variables exist from here on
        self.passes = recipe.horovod.backward_passes_per_step
        self.compression = _optimizer.get_compression(recipe.horovod.compression)
        self.weight_decay = _optimizer.l2_coefficient(recipe.optimizer)
        self.loss_fn = training_loss(recipe.label_smoothing)  # evaluation stays plain cross-entropy
        self._logits = tf.function(lambda x: tf.cast(self.model(x, training=False), tf.float32), reduce_retracing=True)
        self.keras_fit = False
        if recipe.keras_fit:
            self.prepare_fit()
        else:
            self.optimizer = _optimizer.DistributedOptimizer(
                _optimizer.keras_optimizer(recipe.optimizer), self.model, self.loss_fn,
                compression=self.compression, backward_passes_per_step=self.passes, weight_decay=self.weight_decay,
                process_set=self.data_set, clip_norm=recipe.optimizer.clip_norm,
                loss_scale=_optimizer.DynamicLossScale() if recipe.precision == "fp16" else None,
                model_set=self.model_set,
            )
            self.optimizer.build()
            self.keras_optimizer = self.optimizer.optimizer

    def prepare_fit(self) -> None:
        """Switch to ``model.fit``: compile with hvdkit's distributed Keras optimizer (idempotent)."""
        if self.keras_fit:
            return
        from hvdkit.tensorflow._keras import DistributedKerasOptimizer

        previous = getattr(self, "keras_optimizer", None)
        opt = DistributedKerasOptimizer(
            _optimizer.keras_optimizer(self.recipe.optimizer), compression=self.compression,
            backward_passes_per_step=self.passes, weight_decay=self.weight_decay, process_set=self.data_set,
            clip_norm=self.recipe.optimizer.clip_norm, model_set=self.model_set,
        )
        opt.build(self.model.trainable_variables)
        if previous is not None:  # keep any state the custom-loop optimizer already had
            for src, dst in zip(previous.variables, opt.variables):
                dst.assign(src)
        self.model.compile(
            optimizer=opt,
            loss=training_loss(self.recipe.label_smoothing) if self.recipe.label_smoothing
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=False,  # Horovod's ops have no XLA kernels on CPU
        )
        self.keras_optimizer = self.optimizer = opt
        self.keras_fit = True

    # -- model parallelism -----------------------------------------------------------------
    def parameters_local(self) -> int:
        """This rank's parameter count (its slices plus the whole variables it holds)."""
        return int(sum(int(np.prod(v.shape)) for v in self.model.trainable_variables))

    @property
    def layer_comm_s(self) -> float:
        """Seconds this process spent in layer collectives (0.0 when the model is not split)."""
        return tp.layer_comm_seconds() if self.split else 0.0

    def _check_group_batch(self, indices: np.ndarray) -> None:
        """A split model's forward pass needs one batch per model group: the loop shards per model
        copy (``layout.data_rank``). Checked once, on the first batch, by an allgather in the group."""
        idx = tf.constant(np.asarray(indices, dtype=np.int64))
        seen = hvd.allgather(idx[None], process_set=self.model_set, name="hvdkit.tp.batch_check").numpy()
        if not (seen == seen[0]).all():
            raise RuntimeError("the members of a model group were handed different batches: shard the data by "
                               "layout.data_rank over layout.data (hvdkit.core.loop.data_shard)")
        self._batch_checked = True

    def replica_digest(self) -> np.ndarray:
        """[sum, sum of squares] of this rank's trainable weights in float64 (hvdkit.core.loop.replicas_agree)."""
        flat = np.concatenate([np.asarray(v.numpy(), np.float64).reshape(-1) for v in self.model.trainable_variables])
        return np.array([flat.sum(), (flat * flat).sum()])

    def log_model(self, run_id: str, **kwargs: Any) -> Any:
        """Rank 0, a FINISHED job: the trained model on the parent run ``run_id`` with MLflow's
        flavour (hvdkit.tracking._logged_model calls it, duck-typed, with the store set)."""
        from hvdkit.tensorflow._log_model import log_model

        return log_model(self, run_id, **kwargs)

    # -- the loop's contract -------------------------------------------------------------
    def train_feed(self, recipe: Recipe, data_rank: int, data_size: int):
        """Streamed data's batches (one tf.data pipeline per epoch); None: the loop cuts the arrays by ``batch``."""
        return _data.TfFeed(self.data, recipe, data_rank, data_size) if self.streamed else None

    def _val_batches(self):
        if self.streamed:
            return _data.val_batches(self.data, self.data_rank, self.data_size)
        return ((self.x_val[lo : lo + _EVAL_BATCH], self.y_val[lo : lo + _EVAL_BATCH])
                for lo in range(0, len(self.x_val), _EVAL_BATCH))

    def batch(self, indices: np.ndarray) -> Any:
        if self.split and not self._batch_checked:
            self._check_group_batch(indices)
        return tf.convert_to_tensor(self.x[indices]), tf.convert_to_tensor(self.y[indices])

    def train_step(self, batch: Any, lr: float) -> tuple[float, float]:
        if self.keras_fit:
            raise RuntimeError("this backend was prepared for model.fit; use fit()")
        x, y = batch
        return self.optimizer.step(x, y, lr)

    def evaluate(self) -> dict[str, float]:
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self._val_batches():
            logits = self._logits(tf.convert_to_tensor(x))
            loss_sum += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)))
            correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == y))
            count += len(y)
        # Sum counts over ranks so uneven shards weigh by sample count.
        tot = self.allreduce_sum(np.array([loss_sum, correct, count], dtype=np.float64))
        return {"val_loss": float(tot[0] / tot[2]), "val_accuracy": float(tot[1] / tot[2])}

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return hvd.allreduce(tf.constant(values), op=hvd.Sum, name="hvdkit.sum").numpy()

    def gather(self, vector: np.ndarray) -> np.ndarray:
        """Every rank's ``vector`` (shape [k]) stacked: shape [size, k]."""
        return hvd.allgather(tf.constant(np.asarray(vector)[None, :]), name="hvdkit.gather").numpy()

    def broadcast_object(self, obj: Any) -> Any:
        # A fixed name: Horovod defaults to the type name, which differs between rank 0's value
        # and the other ranks' placeholder (see hvdkit.torch).
        return hvd.broadcast_object(obj, root_rank=0, name="hvdkit.object")

    def broadcast_state(self, resumed: bool) -> None:
        if self.split:
            if resumed:
                # Rank 0 read the unsplit checkpoint (load_checkpoint); every rank takes its slices.
                full = hvd.broadcast_object(self._full_state, root_rank=0, name="hvdkit.tp.resume")
                self._full_state = None
                self._load_full(full)
            # Each slice from the first rank of its data-parallel set, whole variables from rank 0;
            # a fresh optimizer is identical everywhere, a resumed one was just loaded alike.
            tp.broadcast_variables(self.model, self.data_set)
            return
        _optimizer.broadcast_variables(self.model.variables, root_rank=0)
        # Optimizer state only when resuming: a fresh optimizer is identical on every rank already.
        if resumed:
            _optimizer.broadcast_variables(self.keras_optimizer.variables, root_rank=0)

    # -- checkpoints of a split model: one file with the unsplit model --------------------
    def _split_axes(self) -> list[int | None]:
        """For each trainable variable: the axis its slices are cut along (None: whole)."""
        axes: dict[int, int | None] = {}
        for layer in self.model._flatten_layers(include_self=False, recursive=True):  # any model's split layers
            if isinstance(layer, tp.ColumnParallelDense):
                axes[id(layer.kernel)] = 1
                if layer.bias is not None:
                    axes[id(layer.bias)] = 0
            elif isinstance(layer, tp.RowParallelDense):
                axes[id(layer.kernel)] = 0
        return [axes.get(id(v)) for v in self.model.trainable_variables]

    def _optimizer_axes(self) -> list[int | None]:
        """The split axis of each optimizer variable. Scalars (iterations, learning rate, hvdkit's
        micro-batch count) are whole; the others are Keras' slots (momentum, Adam's moments) and
        hvdkit's accumulators, made by ``add_variable_from_reference``, which names a slot after
        its variable's path ("<layer>_<weight>_<slot>"): the longest such prefix is its variable."""
        trainable, axes = self.model.trainable_variables, self._split_axes()
        prefixes = sorted(((v.path.replace("/", "_") + "_", v, axis) for v, axis in zip(trainable, axes)),
                          key=lambda t: -len(t[0]))
        out: list[int | None] = []
        for v in self.keras_optimizer.variables:
            if len(v.shape) == 0:
                out.append(None)
                continue
            ref = next(((r, axis) for prefix, r, axis in prefixes if v.name.startswith(prefix)), None)
            if ref is None or tuple(v.shape) != tuple(ref[0].shape):
                raise ValueError(f"optimizer variable {v.path} {tuple(v.shape)}: no trainable variable of its name and shape")
            out.append(ref[1])
        return out

    def _gather(self, value, axis: int | None) -> np.ndarray:
        t = tf.convert_to_tensor(value)
        if axis is None:
            return t.numpy()
        moved = tf.experimental.numpy.moveaxis(t, axis, 0)
        full = hvd.allgather(moved, process_set=self.model_set, name="hvdkit.tp.full")
        return tf.experimental.numpy.moveaxis(full, 0, axis).numpy()

    def _slice(self, full: np.ndarray, axis: int | None) -> np.ndarray:
        if axis is None:
            return full
        m, r = self.layout.model, self.layout.model_rank(self.rank)
        k = full.shape[axis] // m
        return np.take(full, range(r * k, (r + 1) * k), axis=axis)

    def prepare_checkpoint(self) -> None:
        """Every rank, before rank 0's save_checkpoint: a split model gathers its unsplit state
        (model and optimizer, as the plain mlp's) over its model group (a collective)."""
        if not self.split:
            return
        model = [self._gather(v, a) for v, a in zip(self.model.trainable_variables, self._split_axes())]
        opt = [self._gather(v, a) for v, a in zip(self.keras_optimizer.variables, self._optimizer_axes())]
        self._full_state = {"model": model, "optimizer": opt, "iterations": int(self.keras_optimizer.iterations.numpy())}

    def _load_full(self, full: dict) -> None:
        variables = self.model.trainable_variables
        if len(full["model"]) != len(variables):
            raise ValueError(f"{len(full['model'])} model arrays saved, this model has {len(variables)}")
        for v, a, axis in zip(variables, full["model"], self._split_axes()):
            v.assign(self._slice(a, axis))
        opt = self.keras_optimizer.variables
        if len(full["optimizer"]) != len(opt):
            raise ValueError(f"{len(full['optimizer'])} optimizer variables saved, this optimizer has {len(opt)}")
        for v, a, axis in zip(opt, full["optimizer"], self._optimizer_axes()):
            v.assign(self._slice(a, axis))

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        if self.split:
            # The unsplit model in the order of hvdkit's plain mlp (loads into it), and the
            # unsplit optimizer state: a split job of any parallel.model resumes from it.
            if (self._full_state is None
                    or self._full_state.get("iterations") != int(self.keras_optimizer.iterations.numpy())):
                raise RuntimeError("prepare_checkpoint() must run on every rank before rank 0 saves a split model "
                                   "(the state gathered last is missing or older than this step)")
            state, self._full_state = self._full_state, None
            model_arrays, opt_arrays = state["model"], state["optimizer"]
            meta = {**meta, "parallel_model": self.layout.model}
        else:
            model_arrays = [np.asarray(w) for w in self.model.get_weights()]
            opt_arrays = [np.asarray(v) for v in self.keras_optimizer.variables]
        arrays = {f"model/{i:04d}": a for i, a in enumerate(model_arrays)}
        arrays.update({f"optimizer/{i:04d}": a for i, a in enumerate(opt_arrays)})
        arrays["meta"] = np.array(json.dumps(meta))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, **arrays)

        atomic_write(path, write)

    def load_checkpoint(self, path: Path) -> dict:
        with np.load(path, allow_pickle=False) as z:
            model = [z[k] for k in sorted(k for k in z.files if k.startswith("model/"))]
            opt = [z[k] for k in sorted(k for k in z.files if k.startswith("optimizer/"))]
            meta = json.loads(str(z["meta"]))
        if self.split:
            self._full_state = {"model": model, "optimizer": opt}  # split in broadcast_state, on every rank
            return meta
        self.model.set_weights(model)
        variables = self.keras_optimizer.variables
        if len(opt) != len(variables):
            raise ValueError(f"{path}: {len(opt)} optimizer variables saved, this optimizer has {len(variables)}")
        for v, a in zip(variables, opt):
            v.assign(a)
        return meta

    # -- model.fit -------------------------------------------------------------------------
    def fit(self, recipe: Recipe | None = None, tracker: Any = None, **kwargs: Any):
        """Train with ``model.fit`` and hvdkit's Keras callbacks; returns an ``hvdkit.core.Summary``."""
        from hvdkit.tensorflow._keras import fit_with_horovod

        return fit_with_horovod(self, recipe or self.recipe, self.data, tracker=tracker, **kwargs)


def callable_factory(model: Any) -> bool:
    """A model factory (``parallel -> keras.Model``) rather than a built model: a Python recipe's split model."""
    return callable(model) and not isinstance(model, keras.layers.Layer)


def _launcher_size() -> int:
    """The job's size before hvd.init: horovodrun (Gloo) sets HOROVOD_SIZE, MPI launchers their own."""
    for var in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1
