"""PyTorch layer: the only place (with hvdkit.tensorflow) that imports a framework.

Importing this package is cheap; torch and ``horovod.torch`` load when a backend is built.
"""

from __future__ import annotations


def make_backend(recipe, data, model=None):
    from hvdkit.torch._backend import TorchBackend

    return TorchBackend(recipe, data, model)


def check_data(data) -> None:
    """Refuse, before training, data this framework cannot read (e.g. another framework's pipeline)."""
    from hvdkit.core.data import DataSplits

    if isinstance(data, DataSplits) and data.kind not in ("files",):
        import hvdkit.torch._backend  # noqa: F401  (the framework, with its install hint)
        from hvdkit.torch._data import check

        check(data)


__all__ = ["check_data", "make_backend"]
