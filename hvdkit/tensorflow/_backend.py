"""The TensorFlow/Keras 3 backend of the shared loop, on Horovod's core collectives.

``horovod.tensorflow.keras`` and ``DistributedGradientTape`` do not support Keras 3, so the
averaging (:mod:`._optimizer`), the broadcasts and the ``model.fit`` integration (:mod:`._keras`)
are hvdkit's own, built on ``grouped_allreduce``, ``broadcast_variables``, ``allreduce``,
``allgather`` and ``broadcast_object``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit.core import ArrayDataset, apply_horovod_knobs, atomic_write, shard_eval
from hvdkit.recipe import Recipe

tf, hvd = require("tensorflow")

import keras  # noqa: E402

from hvdkit.tensorflow import _models, _optimizer  # noqa: E402
from hvdkit.tensorflow._accelerator import accelerator_name  # noqa: E402

_EVAL_BATCH = 512  # bounds evaluation memory on large validation shards


def sparse_ce(labels, logits):
    """Cross-entropy from logits, mean over the batch (torch's CrossEntropyLoss)."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


class TensorFlowBackend:
    checkpoint_ext = "npz"

    def __init__(self, recipe: Recipe, data: ArrayDataset, model: "keras.Model | None" = None) -> None:
        _optimizer.configure_threads(recipe.threads)  # before any TF op runs
        apply_horovod_knobs(recipe)  # the recipe's cycle time / fusion threshold, unless set
        hvd.init()  # joins the job horovodrun started (Gloo or MPI)
        self.rank, self.size = hvd.rank(), hvd.size()
        # The GPU this rank sees (its name), or None on the CPU: reported to tracking.
        self.accelerator: str | None = accelerator_name(hvd.local_rank())
        keras.utils.set_random_seed(recipe.seed)
        self.recipe, self.data = recipe, data
        # Arrays stay numpy (channel-last already); a batch is one fancy index + one conversion.
        self.x, self.y = data.x_train, data.y_train
        val = shard_eval(len(data.x_val), self.rank, self.size)  # each rank evaluates its slice
        self.x_val, self.y_val = data.x_val[val], data.y_val[val]
        self.model = model if model is not None else _models.build(recipe.model, data.input_shape, data.num_classes)
        self.model(tf.convert_to_tensor(self.x[:1]), training=False)  # variables exist from here on
        self.passes = recipe.horovod.backward_passes_per_step
        self.compression = _optimizer.get_compression(recipe.horovod.compression)
        self.weight_decay = _optimizer.l2_coefficient(recipe.optimizer)
        self.loss_fn = sparse_ce
        self._logits = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        self.keras_fit = False
        if recipe.keras_fit:
            self.prepare_fit()
        else:
            self.optimizer = _optimizer.DistributedOptimizer(
                _optimizer.keras_optimizer(recipe.optimizer), self.model, self.loss_fn,
                compression=self.compression, backward_passes_per_step=self.passes, weight_decay=self.weight_decay,
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
            backward_passes_per_step=self.passes, weight_decay=self.weight_decay,
        )
        opt.build(self.model.trainable_variables)
        if previous is not None:  # keep any state the custom-loop optimizer already had
            for src, dst in zip(previous.variables, opt.variables):
                dst.assign(src)
        self.model.compile(
            optimizer=opt,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=False,  # Horovod's ops have no XLA kernels on CPU
        )
        self.keras_optimizer = self.optimizer = opt
        self.keras_fit = True

    # -- the loop's contract -------------------------------------------------------------
    def batch(self, indices: np.ndarray) -> Any:
        return tf.convert_to_tensor(self.x[indices]), tf.convert_to_tensor(self.y[indices])

    def train_step(self, batch: Any, lr: float) -> tuple[float, float]:
        if self.keras_fit:
            raise RuntimeError("this backend was prepared for model.fit; use fit()")
        x, y = batch
        return self.optimizer.step(x, y, lr)

    def evaluate(self) -> dict[str, float]:
        loss_sum, correct = 0.0, 0
        for lo in range(0, len(self.x_val), _EVAL_BATCH):
            x, y = self.x_val[lo : lo + _EVAL_BATCH], self.y_val[lo : lo + _EVAL_BATCH]
            logits = self._logits(tf.convert_to_tensor(x))
            loss_sum += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)))
            correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == y))
        # Sum counts over ranks so uneven shards weigh by sample count.
        tot = self.allreduce_sum(np.array([loss_sum, correct, len(self.y_val)], dtype=np.float64))
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
        _optimizer.broadcast_variables(self.model.variables, root_rank=0)
        # Optimizer state only when resuming: a fresh optimizer is identical on every rank already.
        if resumed:
            _optimizer.broadcast_variables(self.keras_optimizer.variables, root_rank=0)

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        arrays = {f"model/{i:04d}": np.asarray(w) for i, w in enumerate(self.model.get_weights())}
        arrays.update({f"optimizer/{i:04d}": np.asarray(v) for i, v in enumerate(self.keras_optimizer.variables)})
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
