"""hvdkit.autolog for TensorFlow / Keras 3 scripts: each eager gradient allreduce is a step.

Upstream ``horovod.tensorflow.keras`` and ``DistributedGradientTape`` fail on Keras 3, so a
Keras 3 Horovod script averages its gradients itself with ``hvd.grouped_allreduce`` (one call per
step). We wrap that function: a call is one training step, its duration the comm wait, and the
time since the previous call returned the step time (data, forward, backward and the previous
update all happen in between, so no separate data time is known).

``hvd.allreduce`` is wrapped too, for scripts that average with it instead, but it counts only
while the script has made no ``grouped_allreduce`` call: otherwise a metric average at the end of
an epoch would count as a step. Calls inside a ``tf.function`` run as graph ops, out of Python's
sight: they are not counted (a warning says so once).

The ``tensorflow`` plugin of the ``hvdkit.autolog`` entry-point group (pyproject.toml):
:mod:`hvdkit.tracking.autolog` loads :data:`adapter` and builds it when the script has imported
and initialised ``horovod.tensorflow``. TensorFlow is only touched inside methods, so loading the
plugin in a PyTorch script imports no TensorFlow.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np

from hvdkit.tensorflow._accelerator import accelerator_name
from hvdkit.tracking import keys

log = logging.getLogger("hvdkit.tracking")
_PATCHED = "_hvdkit_autolog"


class TensorFlowAutologAdapter:
    framework = "tensorflow"
    horovod_module = "horovod.tensorflow"  # the Horovod module a script that this adapter serves imports
    priority = 1  # after torch when a script imported (and initialised) both
    unmeasured: frozenset[str] = frozenset({keys.DATA_TIME_S})  # see the module docstring

    def __init__(self, hvd: Any) -> None:
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.accelerator: str | None = accelerator_name(hvd.local_rank())  # the GPU's name, None on the CPU
        self._session: Any = None
        self._originals: list[tuple[Any, str, Any]] = []
        self._grouped_seen = False
        self._warned_graph = False

    # -- collectives for the tracker ----------------------------------------------------------
    def gather(self, vector: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self.hvd.allgather(tf.constant(np.asarray(vector)[None, :]), name="hvdkit.autolog.gather").numpy()

    def broadcast_object(self, obj: Any) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name="hvdkit.autolog.object")

    def versions(self) -> dict[str, str]:
        import tensorflow as tf

        import horovod

        out = {"tensorflow": tf.__version__, "horovod": horovod.__version__}
        try:
            import keras

            out["keras"] = keras.__version__
        except ImportError:
            pass
        return out

    # -- instrumentation ----------------------------------------------------------------------
    def install(self, session: Any) -> None:
        self._session = session
        module = self.hvd
        for name, grouped in (("grouped_allreduce", True), ("allreduce", False)):
            fn = getattr(module, name, None)
            if fn is None or getattr(fn, _PATCHED, False):
                continue
            self._originals.append((module, name, fn))
            setattr(module, name, self._wrap(fn, grouped))

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def _wrap(self, fn, grouped: bool):
        import tensorflow as tf

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not tf.executing_eagerly():
                if not self._warned_graph:
                    self._warned_graph = True
                    log.warning("hvdkit.autolog: hvd.%s inside a tf.function is not timed; call it eagerly "
                                "(between the compiled gradient and apply functions) to track steps", fn.__name__)
                return fn(*args, **kwargs)
            if grouped:
                self._grouped_seen = True
            elif self._grouped_seen:
                return fn(*args, **kwargs)  # a metric average in a grouped_allreduce script
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._session.add_comm(time.perf_counter() - t0)
            self._session.end_step()
            return out

        setattr(wrapper, _PATCHED, True)
        return wrapper


# The ``hvdkit.autolog`` entry point (pyproject.toml): a class with ``framework``,
# ``horovod_module`` and ``priority``, built with the initialised Horovod module.
adapter = TensorFlowAutologAdapter
