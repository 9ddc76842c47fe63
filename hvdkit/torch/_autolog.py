"""hvdkit.autolog for PyTorch scripts: instruments the optimizers ``hvd.DistributedOptimizer`` makes.

The ``torch`` plugin of the ``hvdkit.autolog`` entry-point group (pyproject.toml):
:mod:`hvdkit.tracking.autolog` loads :data:`adapter` and builds it when the script has imported
and initialised ``horovod.torch``. torch and Horovod are only touched inside methods, so loading
the plugin in a TensorFlow script imports neither.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from hvdkit.torch._accelerator import accelerator_name, rank_cuda_device

_PATCHED = "_hvdkit_autolog"  # marks a patched factory / an instrumented optimizer class


class TorchAutologAdapter:
    framework = "torch"
    horovod_module = "horovod.torch"  # the Horovod module a script that this adapter serves imports
    priority = 0  # torch first when a script imported (and initialised) both frameworks' Horovod
    unmeasured: frozenset[str] = frozenset()  # step, data (via zero_grad), comm and rss are all measured

    def __init__(self, hvd: Any) -> None:
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        # The GPU the script trains on by Horovod's convention (torch.cuda.set_device(local
        # rank)), or None without CUDA; autolog() runs before the model exists.
        self.accelerator: str | None = accelerator_name(rank_cuda_device(hvd.local_rank()))
        self._session: Any = None
        self._originals: list[tuple[Any, str, Any]] = []

    # -- collectives for the tracker (fixed names: Horovod matches ops across ranks by name) ---
    def gather(self, vector: np.ndarray) -> np.ndarray:
        import torch

        return self.hvd.allgather(torch.from_numpy(np.asarray(vector)[None, :]), name="hvdkit.autolog.gather").numpy()

    def broadcast_object(self, obj: Any) -> Any:
        # A fixed name: Horovod's default is the object's type name, which differs between rank
        # 0's value and the other ranks' placeholder, and the ranks would never match up.
        return self.hvd.broadcast_object(obj, root_rank=0, name="hvdkit.autolog.object")

    def versions(self) -> dict[str, str]:
        import torch

        import horovod

        return {"torch": torch.__version__, "horovod": horovod.__version__}

    # -- instrumentation ---------------------------------------------------------------------
    def install(self, session: Any) -> None:
        self._session = session
        import horovod.torch
        import horovod.torch.optimizer

        # Both names: scripts call hvd.DistributedOptimizer; the submodule's is the definition.
        for module in (horovod.torch, horovod.torch.optimizer):
            factory = getattr(module, "DistributedOptimizer", None)
            if factory is None or getattr(factory, _PATCHED, False):
                continue
            self._originals.append((module, "DistributedOptimizer", factory))
            setattr(module, "DistributedOptimizer", self._wrap_factory(factory))

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def _wrap_factory(self, factory):
        @functools.wraps(factory)
        def DistributedOptimizer(*args, **kwargs):
            opt = factory(*args, **kwargs)
            self.instrument(opt)
            return opt

        setattr(DistributedOptimizer, _PATCHED, True)
        return DistributedOptimizer

    def instrument(self, opt: Any) -> Any:
        """Patch ``opt``'s class. Horovod builds a new class per DistributedOptimizer call
        (``type(name, (optimizer class,), ...)``), so this touches no other optimizer; and the
        methods must stay on that class (Horovod's ``step`` calls ``super(self.__class__, self)``,
        which a subclass of ours would send into itself)."""
        cls = type(opt)
        if getattr(cls, _PATCHED, False):
            return opt
        session = self._session
        sync, step, zero_grad = cls.synchronize, cls.step, cls.zero_grad

        # functools.wraps also copies torch's ``hooked`` marker from step's profiling wrapper, so
        # torch does not wrap (and run the step hooks) a second time after load_state_dict.
        @functools.wraps(sync)
        def synchronize(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return sync(self, *args, **kwargs)
            finally:
                session.add_comm(time.perf_counter() - t0)

        @functools.wraps(step)
        def step_(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            session.end_step()
            return out

        @functools.wraps(zero_grad)
        def zero_grad_(self, *args, **kwargs):
            session.batch_ready()
            return zero_grad(self, *args, **kwargs)

        cls.synchronize, cls.step, cls.zero_grad = synchronize, step_, zero_grad_
        setattr(cls, _PATCHED, True)
        session.optimizer_ready()
        return opt


# The ``hvdkit.autolog`` entry point (pyproject.toml): a class with ``framework``,
# ``horovod_module`` and ``priority``, built with the initialised Horovod module.
adapter = TorchAutologAdapter
