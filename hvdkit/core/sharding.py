"""Data sharding for data parallelism, framework-free.

Each epoch draws one global permutation from (seed, epoch) — the same on every rank — and cuts it
into global batches of ``batch_size × size``; rank r takes slice r of each. So the ranks' shards
are disjoint, reshuffled every epoch, and step k at np=p sees exactly the samples that step k at
np=1 with batch p·b sees, in the same order: that is what makes g = (1/p) Σ g_i testable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np


class ShardedBatches:
    """This rank's batches, as index arrays into the training samples.

    ``order(epoch)``: the epoch's global order (default: a permutation drawn from (seed, epoch));
    a shard folder passes its shard-major order so consecutive batches read one file at a time.
    ``pad``: the incomplete last global batch is filled with the epoch's first samples (torch's
    DistributedSampler) instead of dropped; either way every rank runs the same number of steps,
    so no rank waits forever on a collective the others never start.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, size: int, seed: int,
                 order: Callable[[int], np.ndarray] | None = None, pad: bool = False) -> None:
        self.num_samples, self.batch_size, self.rank, self.size, self.seed = num_samples, batch_size, rank, size, seed
        self.global_batch = batch_size * size
        self.order, self.pad = order, pad
        self.steps_per_epoch = (-(-num_samples // self.global_batch) if pad and num_samples
                                else num_samples // self.global_batch)
        if self.steps_per_epoch == 0:
            from hvdkit.errors import RecipeError

            raise RecipeError(
                f"batch_size {batch_size} × {size} ranks = {self.global_batch} exceeds the {num_samples} training samples",
                fix="lower batch_size or the number of ranks, or set data.uneven: pad",
            )

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's global order, the same on every rank; padded to whole global batches."""
        perm = self.order(epoch) if self.order else np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)
        short = self.steps_per_epoch * self.global_batch - len(perm)
        if short > 0:
            perm = np.concatenate([perm, np.resize(perm, short)])  # wraps again if one epoch is less than a batch
        return perm

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        perm = self.permutation(epoch)
        lo = self.rank * self.batch_size
        for step in range(self.steps_per_epoch):
            start = step * self.global_batch + lo
            yield perm[start : start + self.batch_size]

    def rank_indices(self, epoch: int) -> np.ndarray:
        """All of this rank's indices for ``epoch``, in order (for tf.data pipelines)."""
        parts = list(self.epoch(epoch))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def shard_eval(num_samples: int, rank: int, size: int) -> slice:
    """Contiguous, nearly equal evaluation shards; the caller weights by count when averaging."""
    per = -(-num_samples // size)
    return slice(rank * per, min(num_samples, (rank + 1) * per))


LAYOUT_RANKS = 32  # ranks listed in shard_layout (it becomes an MLflow tag: a few KB at most)


def shard_layout(layout, recipe, n_val: int | None) -> str:
    """Which samples each rank reads, as short JSON (the MLflow tag hvdkit.shard_layout): every
    epoch one permutation of the training samples (seed) cut into global batches, data rank d
    takes rows [d·b, (d+1)·b) of each (ShardedBatches); the validation split by shard_eval. Ranks
    of one model group (``layout``: core._layout.ParallelLayout) share a data rank."""
    b = recipe.batch_size
    ranks = {}
    for r in range(min(layout.size, LAYOUT_RANKS)):
        d = layout.data_rank(r)
        entry: dict = {"data_rank": d, "batch_rows": [d * b, (d + 1) * b]}
        if n_val:
            val = shard_eval(n_val, d, layout.data)
            entry["val_rows"] = [val.start, val.stop]
        ranks[str(r)] = entry
    doc = {"scheme": "each epoch: a permutation of the training samples (seed) in global batches; a rank takes "
                     "batch_rows of each", "seed": recipe.seed, "global_batch": b * layout.data,
           "uneven": recipe.data.uneven, "ranks": ranks}
    if layout.size > LAYOUT_RANKS:
        doc["more_ranks"] = layout.size - LAYOUT_RANKS
    return json.dumps(doc, separators=(",", ":"))
