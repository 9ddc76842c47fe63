"""Horovod tags on every MLflow run started inside a Horovod launch.

Registered through the ``mlflow.run_context_provider`` entry point, so plain
``mlflow.start_run()`` in a user's script gains ``horovod.*`` tags. It reads the launcher's
environment only (no ``import horovod``: it runs inside every ``start_run`` of the process) and
never raises: an exception here would break the user's run, not just our tags.
"""

from __future__ import annotations

import os
import socket

from mlflow.tracking.context.abstract_context import RunContextProvider

# Per launcher: (rank, size, local_rank, local_size). Gloo (horovodrun's default) first, then
# the MPI flavours horovodrun --mpi may use.
_GLOO = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE")
_MPI = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI (hydra)
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)

TAG_SIZE = "horovod.size"
TAG_RANK = "horovod.rank"
TAG_LOCAL_SIZE = "horovod.local_size"
TAG_HOSTNAME = "horovod.hostname"
TAG_CONTROLLER = "horovod.controller"
TAG_VERSION = "horovod.version"


def _launch() -> tuple[str, tuple[str, str, str, str]] | None:
    env = os.environ
    if _GLOO[0] in env and _GLOO[1] in env:
        controller = env.get("HOROVOD_CONTROLLER", "gloo").lower() or "gloo"
        return controller, _GLOO
    for names in _MPI:
        if names[0] in env:
            return "mpi", names
    return None


def _horovod_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("horovod")
    except PackageNotFoundError:
        return None


def horovod_tags() -> dict[str, str]:
    launch = _launch()
    if launch is None:
        return {}
    controller, (rank, size, local_rank, local_size) = launch
    env = os.environ
    tags = {TAG_CONTROLLER: controller}
    for tag, var in ((TAG_RANK, rank), (TAG_SIZE, size), (TAG_LOCAL_SIZE, local_size)):
        if env.get(var, "").strip():
            tags[tag] = env[var].strip()
    tags[TAG_HOSTNAME] = env.get("HOROVOD_HOSTNAME") or socket.gethostname()
    v = _horovod_version()
    if v:
        tags[TAG_VERSION] = v
    return tags


class HorovodRunContextProvider(RunContextProvider):
    def in_context(self) -> bool:
        try:
            return _launch() is not None
        except Exception:  # noqa: BLE001 - see module docstring
            return False

    def tags(self) -> dict[str, str]:
        try:
            return horovod_tags()
        except Exception:  # noqa: BLE001 - see module docstring
            return {}
