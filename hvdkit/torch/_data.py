"""Streamed data on torch: shard folders, and a recipe's own ``torch.utils.data.Dataset``.

Sharding is the loop's (:class:`hvdkit.core.sharding.ShardedBatches`): a ``DataLoader`` is handed
this rank's batches of indices as its ``batch_sampler``, so the DistributedSampler contract holds
(disjoint shards, a fresh shared-seed order every epoch, the same number of steps on every rank)
and step k at np=p sees what step k at np=1 with batch p·b sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from hvdkit.core.data import DataSplits
from hvdkit.core.feed import IndexFeed, read_ahead
from hvdkit.core.sharding import ShardedBatches, shard_eval
from hvdkit.errors import RecipeError

import torch  # noqa: E402  (hvdkit.torch._backend imported it with an install hint first)
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset  # noqa: E402

EVAL_BATCH = 1024


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Channel-last image arrays as torch's NCHW tensors (as the built-in arrays are fed)."""
    if x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))


def model_input_shape(data: DataSplits) -> tuple[int, ...]:
    """What the model sees: a shard folder's channel-last images turned NCHW; a Dataset's items as they are."""
    shape = tuple(data.input_shape)
    if data.kind == "files" and len(shape) == 3:
        return (shape[2], shape[0], shape[1])
    return shape


def check(data: DataSplits) -> None:
    """What the duck-typed check in core (``hvdkit.core.data.check_data``, run first) cannot tell:
    a torch-looking object that is not a Dataset, a stream with no length. One line, exit 2."""
    if data.kind != "torch":
        return
    if not isinstance(data.train, Dataset):
        raise RecipeError(f"build_data returned {type(data.train).__name__}, not a torch.utils.data.Dataset",
                          fix="return DataSplits(train=<a torch Dataset>, ...)")
    if isinstance(data.train, IterableDataset):
        try:
            len(data.train)
        except TypeError:
            raise RecipeError(
                f"build_data returned an IterableDataset ({type(data.train).__name__}) without __len__: every rank "
                "must run the same number of steps", fix="give it __len__ (its samples per epoch), or return a "
                "map-style Dataset") from None


class _RankStream(IterableDataset):
    """A recipe's IterableDataset dealt to the ranks: item k of the stream goes to rank k mod size
    (disjoint shards), the rank's items are cut into ``steps`` batches (equal steps everywhere;
    the tail that does not fill a global batch is dropped) and batch q is assembled by DataLoader
    worker q mod workers, which the DataLoader hands out in order: the same batches, in the same
    order, with or without workers. Before each epoch the stream's own ``set_epoch(epoch)`` is
    called when it has one (how a stream reshuffles itself, e.g. its file order, from the epoch)."""

    def __init__(self, source: "IterableDataset", rank: int, size: int, batch: int, steps: int) -> None:
        self.source, self.rank, self.size, self.batch, self.steps = source, rank, size, batch, steps
        self.epoch = 0

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import default_collate, get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)
        need, pending, mine = self.steps * self.batch, [], 0
        for k, item in enumerate(self.source):
            if k % self.size != self.rank:
                continue
            if mine >= need:
                break
            if (mine // self.batch) % workers == worker:
                pending.append(item)
                if len(pending) == self.batch:
                    yield default_collate(pending)
                    pending = []
            mine += 1
        if mine < need:
            raise RecipeError(f"the IterableDataset {type(self.source).__name__} ended after {mine} items for rank "
                              f"{self.rank}, fewer than the {need} its __len__ {len(self.source)} promises",
                              fix="make __len__ return the number of samples one epoch yields")


class StreamFeed:
    """A recipe's IterableDataset through a DataLoader (workers re-created each epoch: they copy
    the epoch number); with no workers, one thread reads ahead."""

    def __init__(self, dataset: "IterableDataset", recipe, data_rank: int, data_size: int) -> None:
        b, n = recipe.batch_size, len(dataset)
        if recipe.data.uneven == "pad":
            raise RecipeError("data.uneven: pad with an IterableDataset: a stream cannot be wrapped around",
                              fix="set data.uneven: drop, or return a map-style Dataset")
        self.steps_per_epoch = n // (b * data_size)
        if self.steps_per_epoch == 0:
            raise RecipeError(f"batch_size {b} × {data_size} ranks = {b * data_size} exceeds the {n} training samples",
                              fix="lower batch_size or the number of ranks")
        self.stream = _RankStream(dataset, data_rank, data_size, b, self.steps_per_epoch)
        workers = recipe.data.workers
        kw: dict[str, Any] = {"num_workers": workers, "batch_size": None}
        if workers:
            kw["prefetch_factor"] = max(1, recipe.data.prefetch)
        self.loader = DataLoader(self.stream, **kw)
        self.prefetch = 0 if workers else recipe.data.prefetch

    def epoch(self, epoch: int) -> Iterator[tuple[Any, int]]:
        self.stream.epoch = epoch
        batches = ((batch, len(batch[1])) for batch in self.loader)
        return read_ahead(batches, self.prefetch) if self.prefetch else batches


class _EpochBatches:
    """A ``batch_sampler``: this rank's index batches of the current epoch (set before iterating)."""

    def __init__(self, sharding: ShardedBatches) -> None:
        self.sharding, self.epoch = sharding, 0

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.sharding.epoch(self.epoch))

    def __len__(self) -> int:
        return self.sharding.steps_per_epoch


class LoaderFeed:
    """A recipe's map-style Dataset through a DataLoader: ``data.workers`` worker processes (kept
    across epochs), each reading ``data.prefetch`` batches ahead; with no workers, one thread reads ahead."""

    def __init__(self, dataset: "Dataset", sharding: ShardedBatches, workers: int, prefetch: int) -> None:
        self.sampler = _EpochBatches(sharding)
        kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0}
        if workers:
            kw["prefetch_factor"] = max(1, prefetch)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, **kw)
        self.prefetch = 0 if workers else prefetch
        self.steps_per_epoch = sharding.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[tuple[Any, int]]:
        self.sampler.epoch = epoch
        batches = ((batch, len(batch[1])) for batch in self.loader)
        return read_ahead(batches, self.prefetch) if self.prefetch else batches


def train_feed(data: DataSplits, recipe, data_rank: int, data_size: int):
    """This rank's training batches for a shard folder or a recipe's Dataset."""
    train = data.train
    if isinstance(train, IterableDataset):
        return StreamFeed(train, recipe, data_rank, data_size)
    order = train.epoch_order if data.kind == "files" else None
    sharding = ShardedBatches(len(train), recipe.batch_size, data_rank, data_size, recipe.seed,
                              order=(lambda e: order(recipe.seed, e)) if order else None,
                              pad=recipe.data.uneven == "pad")
    if data.kind == "files":
        return IndexFeed(sharding, lambda idx: to_tensors(*train.take(idx)), recipe.data.prefetch)
    return LoaderFeed(train, sharding, recipe.data.workers, recipe.data.prefetch)


def val_batches(data: DataSplits, recipe, data_rank: int, data_size: int) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """This rank's contiguous slice of the validation data, in pieces (counts weigh the average)."""
    val = data.val
    if val is None:
        return iter(())
    if isinstance(val, IterableDataset):  # dealt like the training stream, the tail included
        mine = (item for k, item in enumerate(val) if k % data_size == data_rank)
        return _collated(mine, EVAL_BATCH)
    part = shard_eval(len(val), data_rank, data_size)
    if data.kind == "files":
        return (to_tensors(x, y) for x, y in val.chunks(part.start, part.stop, EVAL_BATCH))
    loader = DataLoader(Subset(val, range(part.start, part.stop)), batch_size=EVAL_BATCH, num_workers=recipe.data.workers)
    return ((x, y.long()) for x, y in loader)


def _collated(items: Iterator[Any], size: int) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    from torch.utils.data import default_collate

    pending = []
    for item in items:
        pending.append(item)
        if len(pending) == size:
            x, y = default_collate(pending)
            yield x, y.long()
            pending = []
    if pending:
        x, y = default_collate(pending)
        yield x, y.long()
