"""hvdkit: Horovod that builds on today's frameworks, framework-agnostic recipes, MLflow tracking.

Importing ``hvdkit`` imports no framework: torch, TensorFlow and Horovod load lazily
inside ``hvdkit.torch`` / ``hvdkit.tensorflow``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def autolog(*args, **kwargs):
    """One line after ``hvd.init()`` in an unmodified Horovod script: see :mod:`hvdkit.tracking.autolog`."""
    from hvdkit.tracking.autolog import autolog as _autolog

    return _autolog(*args, **kwargs)


__all__ = ["__version__", "autolog"]
