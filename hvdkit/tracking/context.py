"""Horovod tags on every MLflow run started inside a Horovod launch.

Registered through the ``mlflow.run_context_provider`` entry point, so plain
``mlflow.start_run()`` in a user's script gains ``horovod.*`` tags (and ``slurm.*`` ones inside a
Slurm job). It reads the launcher's
environment only (no ``import horovod``: it runs inside every ``start_run`` of the process) and
never raises: an exception here would break the user's run, not just our tags.
"""

from __future__ import annotations

from mlflow.tracking.context.abstract_context import RunContextProvider

# What the provider reads lives in _launch_env (no MLflow import there, for World on every rank).
from hvdkit.tracking._launch_env import (  # noqa: F401 - re-exported: the tags, the launch helpers
    _GLOO, _MPI, _SLURM, SLURM_TAGS, TAG_CONTROLLER, TAG_HOSTNAME, TAG_LOCAL_SIZE, TAG_RANK, TAG_SIZE,
    TAG_SLURM_JOB_ID, TAG_VERSION, _horovod_version, _is_slurm_task, _launch, _slurm_local_size, horovod_tags,
    launch_value, rank_hostname, slurm_tags,
)


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
