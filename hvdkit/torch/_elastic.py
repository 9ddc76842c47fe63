"""Horovod elastic for the PyTorch backend: the state and the ``run`` wrapper hvdkit's elastic
loop (:mod:`hvdkit.core.elastic`) is handed.

Upstream's ``TorchState`` with two corrections, both about a worker whose optimizer has no
state yet (a joiner, or every worker before the first step):

* ``sync`` broadcasts the optimizer before the model. Horovod initialises an empty optimizer
  state with a zero-gradient step, which weight decay (or AdamW) turns into a real parameter
  update; done after the model broadcast (upstream's order) it leaves a joiner's parameters
  different from everyone else's, for good.
* The optimizer state is broadcast only once rank 0 has one: a fresh job starts exactly as a
  fixed-size one does (no zero-gradient step at all).

A failure can leave gradient allreduces pending in the DistributedOptimizer (its hooks fired,
the peer died before they completed); they are dropped at every reset, or the next
``zero_grad()`` would refuse to run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit.core import shard_eval
from hvdkit.core.elastic import FAILURE, START, recording_reason

torch, hvd = require("torch")

import horovod.torch.elastic as hvd_elastic  # noqa: E402
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt  # noqa: E402
from horovod.torch.elastic.state import TorchState  # noqa: E402


class HvdkitTorchState(TorchState):
    on_failure: Callable[[], None] | None = None  # set by ElasticSupport: a peer died during the sync

    def sync(self) -> None:
        try:
            self._sync()
        except HorovodInternalError:
            if self.on_failure is not None:
                self.on_failure()
            raise

    def _sync(self) -> None:
        has_state = bool(hvd.broadcast_object(bool(self.optimizer.state_dict()["state"]) if hvd.rank() == 0 else None,
                                              root_rank=0, name="hvdkit.elastic.optstate"))
        if has_state:
            self._handlers["optimizer"].sync()
        self._handlers["model"].sync()
        for name, handler in self._handlers.items():
            if name not in ("model", "optimizer"):
                handler.sync()
        super(TorchState, self).sync()  # ObjectState: the progress attributes, from rank 0

    def restore(self) -> None:
        _drop_pending(self.optimizer)
        super().restore()

    def reset(self) -> None:
        _drop_pending(self.optimizer)


def _drop_pending(optimizer: Any) -> None:
    """Forget allreduces a failure left behind in Horovod's DistributedOptimizer."""
    handles = getattr(optimizer, "_handles", None)
    if handles:
        handles.clear()
    passes = getattr(optimizer, "backward_passes_per_step", 1)
    delay = getattr(optimizer, "_allreduce_delay", None)
    if delay:
        for p in delay:
            delay[p] = passes
    counts = getattr(optimizer, "_group_counts", None)
    if counts:
        for g in counts:
            counts[g] = 0
    if hasattr(optimizer, "_synchronized"):
        optimizer._synchronized = False
    optimizer.zero_grad()


class ElasticSupport:
    """:class:`hvdkit.core.elastic.ElasticSupport` for a :class:`~hvdkit.torch._backend.TorchBackend`."""

    def __init__(self, backend: Any, data: Any) -> None:
        self.backend = backend
        self.data = data
        self.reason = START

    def state(self, **progress: Any) -> HvdkitTorchState:
        state = HvdkitTorchState(model=self.backend.model, optimizer=self.backend.optimizer, **progress)
        object.__setattr__(state, "on_failure", lambda: setattr(self, "reason", FAILURE))
        return state

    def run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return hvd_elastic.run(recording_reason(self, fn, HorovodInternalError, HostsUpdatedInterrupt))

    def on_reset(self) -> None:
        b = self.backend
        b.rank, b.size = hvd.rank(), hvd.size()
        val = shard_eval(len(self.data.x_val), b.rank, b.size)
        b.x_val = torch.from_numpy(np.ascontiguousarray(self.data.x_val[val].transpose(0, 3, 1, 2)))
        b.y_val = torch.from_numpy(self.data.y_val[val])

    def local_rank(self) -> int:
        return hvd.local_rank()

    def is_hosts_updated(self, exc: BaseException) -> bool:
        return isinstance(exc, HostsUpdatedInterrupt)

    def broadcast_object(self, obj: Any) -> Any:
        return hvd.broadcast_object(obj, root_rank=0, name="hvdkit.elastic.object")


def make_support(backend: Any, data: Any) -> ElasticSupport:
    return ElasticSupport(backend, data)


__all__ = ["ElasticSupport", "HvdkitTorchState", "make_support"]
