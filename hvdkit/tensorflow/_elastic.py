"""Horovod elastic for the TensorFlow/Keras 3 backend: hvdkit's own state and ``run`` wrapper.

Upstream's ``TensorFlowKerasState`` sits on ``horovod.tensorflow.keras``, which fails on Keras 3
(see :mod:`hvdkit.tensorflow._optimizer`), so :class:`KerasState` is written on Horovod's core
``ObjectState``: ``save`` copies the model's and the optimizer's variables to numpy, ``restore``
assigns them back, ``sync`` broadcasts them (hvdkit's ``broadcast_variables``) and the progress
attributes from rank 0.

Horovod's TensorFlow ops report a dead peer as a TensorFlow ``OpError`` naming the Horovod op;
upstream's wrapper recognises ``HorovodAllreduce``/``Allgather``/``Broadcast`` only, not the
``HorovodGroupedAllreduce`` hvdkit averages gradients with. Here any ``OpError`` from a Horovod
op becomes ``HorovodInternalError``, so Horovod rolls back and resets instead of the worker dying.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit.core import shard_eval
from hvdkit.core.elastic import FAILURE, START, recording_reason

tf, hvd = require("tensorflow")

from horovod.common.elastic import ObjectState, run_fn  # noqa: E402
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt  # noqa: E402

from hvdkit.tensorflow import _optimizer  # noqa: E402


def _is_horovod_error(exc: BaseException) -> bool:
    return isinstance(exc, tf.errors.OpError) and "horovod" in str(exc).lower()


def _converted(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except tf.errors.OpError as exc:
        if _is_horovod_error(exc):
            raise HorovodInternalError(exc) from exc
        raise


def _reset() -> None:
    hvd.shutdown()
    hvd.init()


class KerasState(ObjectState):
    """Model + optimizer variables (numpy copies) and plain progress attributes."""

    def __init__(self, backend: Any, on_failure: Callable[[], None] | None = None, **progress: Any) -> None:
        self._backend = backend
        self._on_failure = on_failure
        self._saved_vars = self._read()
        super().__init__(bcast_object=self._bcast, get_rank=hvd.rank, **progress)

    @staticmethod
    def _bcast(obj: Any) -> Any:
        return hvd.broadcast_object(obj, root_rank=0, name="hvdkit.elastic.object")

    def _variables(self) -> list:
        b = self._backend
        return list(b.model.variables) + list(b.keras_optimizer.variables)

    def _read(self) -> list[np.ndarray]:
        return [np.array(v.numpy() if hasattr(v, "numpy") else v, copy=True) for v in self._variables()]

    def _assign(self, values: list[np.ndarray]) -> None:
        for v, a in zip(self._variables(), values):
            v.assign(a)
        _forget_lr(self._backend)

    def save(self) -> None:
        self._saved_vars = self._read()
        super().save()

    def restore(self) -> None:
        self._assign(self._saved_vars)
        super().restore()

    def sync(self) -> None:
        def body() -> None:
            _optimizer.broadcast_variables(self._variables(), root_rank=0)
            super(KerasState, self).sync()

        try:
            _converted(body)
        except HorovodInternalError:
            if self._on_failure is not None:
                self._on_failure()
            raise
        self._saved_vars = self._read()  # what a rollback before the next commit returns to
        _forget_lr(self._backend)

    def reset(self) -> None:
        _forget_lr(self._backend)


def _forget_lr(backend: Any) -> None:
    """The DistributedOptimizer caches the rate it last assigned; variables changed under it."""
    opt = getattr(backend, "optimizer", None)
    if hasattr(opt, "_lr"):
        opt._lr = None


class ElasticSupport:
    """:class:`hvdkit.core.elastic.ElasticSupport` for a :class:`~hvdkit.tensorflow._backend.TensorFlowBackend`."""

    def __init__(self, backend: Any, data: Any) -> None:
        if getattr(backend, "keras_fit", False):
            from hvdkit.errors import UsageError

            raise UsageError("elastic training runs hvdkit's own loop; this recipe sets keras_fit: true",
                             fix="set keras_fit=false for --elastic (same model, optimizer and averaging)")
        self.backend = backend
        self.data = data
        self.reason = START

    def state(self, **progress: Any) -> KerasState:
        return KerasState(self.backend, on_failure=lambda: setattr(self, "reason", FAILURE), **progress)

    def run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return run_fn(recording_reason(self, fn, HorovodInternalError, HostsUpdatedInterrupt, call=_converted), _reset)

    def on_reset(self) -> None:
        b = self.backend
        b.rank, b.size = hvd.rank(), hvd.size()
        val = shard_eval(len(self.data.x_val), b.rank, b.size)
        b.x_val, b.y_val = self.data.x_val[val], self.data.y_val[val]

    def local_rank(self) -> int:
        return hvd.local_rank()

    def is_hosts_updated(self, exc: BaseException) -> bool:
        return isinstance(exc, HostsUpdatedInterrupt)

    def broadcast_object(self, obj: Any) -> Any:
        return hvd.broadcast_object(obj, root_rank=0, name="hvdkit.elastic.object")


def make_support(backend: Any, data: Any) -> ElasticSupport:
    return ElasticSupport(backend, data)


__all__ = ["ElasticSupport", "KerasState", "make_support"]
