"""Streamed data on TensorFlow: shard folders, and a recipe's own ``tf.data.Dataset``.

Every epoch is one ``tf.data`` pipeline of this rank's batches, used by the custom loop and by
Keras ``fit`` alike:

- a shard folder: :class:`hvdkit.core.sharding.ShardedBatches` over its shard-major order (the
  loop's sharding, so np=p × b sees what np=1 × p·b sees), read ahead by ``prefetch``;
- a ``tf.data.Dataset`` of unbatched ``(x, y)``: shuffled with a seed drawn from (seed, epoch),
  the same on every rank, then ``shard(size, rank)``: element i of the shuffled stream goes to
  rank i mod size, so the ranks' shards are disjoint, and the samples of global batch k at np=p
  are those of batch k at np=1 with batch p·b. ``take(steps)`` gives every rank the same number
  of steps; ``data.uneven: pad`` wraps the epoch's own order around to fill the last batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from hvdkit.core.data import DataSplits
from hvdkit.core.sharding import ShardedBatches, shard_eval
from hvdkit.errors import RecipeError

import tensorflow as tf  # noqa: E402  (hvdkit.tensorflow._backend imported it with an install hint first)

EVAL_BATCH = 1024


def check(data: DataSplits) -> None:
    """What the duck-typed check in core (``hvdkit.core.data.check_data``, run first) cannot tell:
    a TensorFlow-looking object that is not a tf.data.Dataset. One line, exit 2."""
    if data.kind == "tf.data" and not isinstance(data.train, tf.data.Dataset):
        raise RecipeError(f"build_data returned {type(data.train).__name__}, not a tf.data.Dataset",
                          fix="return DataSplits(train=<a tf.data.Dataset of (x, y)>, ...), e.g. via "
                              "tf.data.Dataset.from_tensor_slices or a PyDataset's items")


def _cardinality(ds: "tf.data.Dataset", what: str) -> int:
    n = int(ds.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise RecipeError(f"the {what} tf.data pipeline is infinite (it ends in .repeat())",
                          fix="return the dataset of one epoch: hvdkit repeats and shards it itself")
    if n == tf.data.UNKNOWN_CARDINALITY:  # e.g. after filter(): counted once, at the start
        n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
    return n


class TfFeed:
    """This rank's batches, one tf.data pipeline per epoch (``epoch_dataset``)."""

    def __init__(self, data: DataSplits, recipe, data_rank: int, data_size: int) -> None:
        self.data, self.recipe = data, recipe
        self.rank, self.size, self.batch = data_rank, data_size, recipe.batch_size
        self.pad, self.prefetch = recipe.data.uneven == "pad", recipe.data.prefetch
        shape = tuple(data.input_shape)
        if data.kind == "files":
            train = data.train
            self.sharding = ShardedBatches(len(train), self.batch, data_rank, data_size, recipe.seed,
                                           order=lambda e: train.epoch_order(recipe.seed, e), pad=self.pad)
            self.steps_per_epoch = self.sharding.steps_per_epoch
            self.signature = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64))
        elif data.kind == "keras":
            # A PyDataset's items are its own batches: a global step takes data_size of them, one
            # per rank, from an order of its batches drawn from (seed, epoch), the same everywhere.
            self.sharding = ShardedBatches(len(data.train), 1, data_rank, data_size, recipe.seed, pad=self.pad)
            self.steps_per_epoch = self.sharding.steps_per_epoch
            x0, y0 = data.train[0][:2]
            if len(y0) != self.batch:  # the throughput, the LR rule and Keras fit count batch_size samples a step
                raise RecipeError(f"the PyDataset's batches hold {len(y0)} samples but batch_size is {self.batch}",
                                  fix=f"set batch_size: {len(y0)} in the recipe (a PyDataset batches itself)")
            self.signature = (tf.TensorSpec((None, *np.shape(x0)[1:]), tf.float32), tf.TensorSpec((None,), tf.int64))
        else:
            self.num_samples = _cardinality(data.train, "training")
            global_batch = self.batch * data_size
            self.steps_per_epoch = (math.ceil(self.num_samples / global_batch) if self.pad
                                    else self.num_samples // global_batch)
            if self.steps_per_epoch == 0:
                raise RecipeError(f"batch_size {self.batch} × {data_size} ranks = {global_batch} exceeds the "
                                  f"{self.num_samples} training samples",
                                  fix="lower batch_size or the number of ranks, or set data.uneven: pad")

    def epoch_dataset(self, epoch: int) -> "tf.data.Dataset":
        if self.data.kind == "files":
            train, sharding = self.data.train, self.sharding
            ds = tf.data.Dataset.from_generator(lambda: (train.take(idx) for idx in sharding.epoch(epoch)),
                                                output_signature=self.signature)
        elif self.data.kind == "keras":
            train, sharding = self.data.train, self.sharding
            if hasattr(train, "on_epoch_begin"):
                train.on_epoch_begin()
            ds = tf.data.Dataset.from_generator(
                lambda: (_xy(train[int(i)]) for (i,) in sharding.epoch(epoch)), output_signature=self.signature)
        else:
            seed = (self.recipe.seed * 1_000_003 + epoch) % (2**31 - 1)  # the same on every rank
            ds = self.data.train.shuffle(min(self.num_samples, self.recipe.data.shuffle_buffer), seed=seed,
                                         reshuffle_each_iteration=False)
            if self.pad:
                ds = ds.repeat()  # the same order again: its head fills the last batch
            ds = ds.shard(self.size, self.rank).take(self.steps_per_epoch * self.batch)
            if self.data.decode is not None:  # after the shard: this rank decodes its own samples only
                ds = ds.map(self.data.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(self.batch, drop_remainder=True).map(lambda x, y: (x, tf.cast(y, tf.int64)))
        return ds.prefetch(self.prefetch) if self.prefetch else ds

    def epoch(self, epoch: int) -> Iterator[tuple[Any, int]]:
        for x, y in self.epoch_dataset(epoch):
            yield (x, y), int(y.shape[0])

    def fit_dataset(self, epochs: range, micro_batch: int, num_batches: int) -> "tf.data.Dataset":
        """The epochs' batches back to back for ``model.fit``, cut into Keras batches of ``micro_batch``."""
        parts = [self.epoch_dataset(e) for e in epochs]
        ds = parts[0] if parts else tf.data.Dataset.from_tensor_slices(
            (np.zeros((0, *self.data.input_shape), np.float32), np.zeros((0,), np.int64))).batch(1)
        for part in parts[1:]:
            ds = ds.concatenate(part)
        if micro_batch != self.batch:  # backward_passes_per_step > 1: Keras batches are micro-batches
            ds = ds.rebatch(micro_batch)
        return ds.take(num_batches)


def _xy(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """A PyDataset batch (x, y[, sample_weight]) as float32 x and int64 labels."""
    x, y = batch[0], batch[1]
    return np.asarray(x, np.float32), np.asarray(y, np.int64).reshape(-1)


def val_batches(data: DataSplits, data_rank: int, data_size: int) -> Iterator[tuple[Any, np.ndarray]]:
    """This rank's part of the validation data, in pieces (counts weigh the average)."""
    val = data.val
    if val is None:
        return iter(())
    if data.kind == "files":
        part = shard_eval(len(val), data_rank, data_size)
        return val.chunks(part.start, part.stop, EVAL_BATCH)
    if data.kind == "keras":  # its batches dealt to the ranks; counts weigh the average
        return (_xy(val[i]) for i in range(data_rank, len(val), data_size))
    val = val.shard(data_size, data_rank)
    if data.decode is not None:
        val = val.map(data.decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ((x, y.numpy().astype(np.int64)) for x, y in val.batch(EVAL_BATCH))
