"""Data sharding for data parallelism, framework-free.

Each epoch draws one global permutation from (seed, epoch) — the same on every rank — and cuts it
into global batches of ``batch_size × size``; rank r takes slice r of each. So the ranks' shards
are disjoint, reshuffled every epoch, and step k at np=p sees exactly the samples that step k at
np=1 with batch p·b sees, in the same order: that is what makes g = (1/p) Σ g_i testable.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ShardedBatches:
    def __init__(self, num_samples: int, batch_size: int, rank: int, size: int, seed: int) -> None:
        self.num_samples, self.batch_size, self.rank, self.size, self.seed = num_samples, batch_size, rank, size, seed
        self.global_batch = batch_size * size
        # The incomplete last global batch is dropped: every rank must run the same number of steps.
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            from hvdkit.errors import RecipeError

            raise RecipeError(
                f"batch_size {batch_size} × {size} ranks = {self.global_batch} exceeds the {num_samples} training samples",
                fix="lower batch_size or the number of ranks",
            )

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)
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
