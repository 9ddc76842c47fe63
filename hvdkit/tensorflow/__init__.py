"""TensorFlow/Keras 3 layer: the only place (with hvdkit.torch) that imports a framework.

Importing this package is cheap; tensorflow, keras and ``horovod.tensorflow`` load when a backend
is built or one of the Keras pieces below is first used (``hvdkit.tensorflow.MetricAverageCallback``
imports them then).
"""

from __future__ import annotations

from typing import Any


def make_backend(recipe, data, model=None):
    from hvdkit.tensorflow._backend import TensorFlowBackend

    return TensorFlowBackend(recipe, data, model)


def check_data(data) -> None:
    """Refuse, before training, data this framework cannot read (e.g. another framework's pipeline)."""
    from hvdkit.core.data import DataSplits

    if isinstance(data, DataSplits) and data.kind not in ("files",):
        import hvdkit.tensorflow._backend  # noqa: F401  (the framework, with its install hint)
        from hvdkit.tensorflow._data import check

        check(data)


def before_model_build(recipe) -> None:
    """What must hold before a recipe's own model is built: Keras' dtype policy (``precision``)."""
    from hvdkit.tensorflow._backend import set_precision

    set_precision(recipe)


# Public names loaded on first use, so `import hvdkit.tensorflow` never imports TensorFlow.
_LAZY = {
    "TensorFlowBackend": "hvdkit.tensorflow._backend",
    "DistributedOptimizer": "hvdkit.tensorflow._optimizer",
    "DistributedKerasOptimizer": "hvdkit.tensorflow._keras",
    "BroadcastGlobalVariablesCallback": "hvdkit.tensorflow._keras",
    "MetricAverageCallback": "hvdkit.tensorflow._keras",
    "LearningRateWarmupCallback": "hvdkit.tensorflow._keras",
    "fit_with_horovod": "hvdkit.tensorflow._keras",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["before_model_build", "check_data", "make_backend", *_LAZY]
