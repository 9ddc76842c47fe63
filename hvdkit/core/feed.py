"""What the training loop iterates: an epoch of this rank's batches, ready for ``train_step``.

Framework-free. A backend builds its feed from the data it was handed (arrays, a shard folder,
a framework's own pipeline); the loop only sees ``steps_per_epoch`` and ``epoch(e)``, and times
``next()`` as ``data_time_s``. Reading ahead (``prefetch``) runs in one thread per rank.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from hvdkit.core.sharding import ShardedBatches


class Feed(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterator[tuple[Any, int]]:
        """This rank's batches of ``epoch`` as (batch, samples in it); exactly steps_per_epoch of them."""


class IndexFeed:
    """Batches cut from index arrays (:class:`ShardedBatches`) by ``fetch(indices)``: the built-in
    arrays (no read-ahead: a batch is one index op) and shard folders (read ahead in a thread)."""

    def __init__(self, sharding: ShardedBatches, fetch: Callable[[np.ndarray], Any], prefetch: int = 0) -> None:
        self.sharding, self.fetch, self.prefetch = sharding, fetch, prefetch
        self.steps_per_epoch = sharding.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[tuple[Any, int]]:
        batches = ((self.fetch(idx), len(idx)) for idx in self.sharding.epoch(epoch))
        return read_ahead(batches, self.prefetch) if self.prefetch else batches


_END = object()


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items`` produced by a daemon thread up to ``depth`` ahead of the consumer. An error in the
    producer is raised in the consumer; a consumer that stops early (a step budget, an early stop)
    releases the thread: it is bounded by ``depth`` and ends at the next put."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer is gone

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_END, exc))

    thread = threading.Thread(target=produce, name="hvdkit-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
