"""PyTorch layer: the only place (with hvdkit.tensorflow) that imports a framework.

Importing this package is cheap; torch and ``horovod.torch`` load when a backend is built.
"""

from __future__ import annotations


def make_backend(recipe, data, model=None):
    from hvdkit.torch._backend import TorchBackend

    return TorchBackend(recipe, data, model)


__all__ = ["make_backend"]
