"""Job ids and experiment names: decided here and nowhere else. Framework-free, below every layer.

A job id is sortable by start time and unique by its random part, or derived from the Slurm job
inside one; only [0-9A-Za-z._-] (safe in MLflow filters and as a folder name). The experiment a job
writes to is resolved here too, so the launcher, the ranks and the tracker agree on it.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

DEFAULT_EXPERIMENT = "hvdkit"


def experiment_name(experiment: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The experiment a job writes to: the option, else ``$MLFLOW_EXPERIMENT_NAME``, else ``hvdkit``."""
    env = os.environ if env is None else env
    return experiment or env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def new_job_id(checkpoint_dir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> str:
    """A new job's id. Inside a Slurm job, derived from it (:func:`slurm_job_id`): one hvdkit job,
    one set of MLflow runs, per Slurm job. Elsewhere sortable by start time, unique by the random
    part; only [0-9a-f-] (safe in MLflow filters)."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return slurm_job_id(checkpoint_dir, env)
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _slurm_reservations() -> Path:
    return Path(tempfile.gettempdir()) / f"hvdkit-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "slurm-jobs"


def slurm_job_id(checkpoint_dir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> str:
    """``slurm-<SLURM_JOB_ID>`` for the first hvdkit job of a Slurm job, ``slurm-<id>-2``, ``-3``...
    for the next ones the same allocation runs (a batch script with several ``hvdkit run``
    lines, a sweep), and ``slurm-<id>-r<k>`` for requeue k when there was no job to continue
    (checkpoints off; with them, :func:`slurm_requeue_spec` continues the first one).

    Not the step id: srun picks it only once the step starts, after the launcher needs the id.
    A number is taken once: an id is reserved by creating its file exclusively in this node's
    temporary directory, and skipped when the recipe's checkpoint folder already holds a job of
    that id (the folders are shared by the nodes; the temporary directory is not)."""
    env = os.environ if env is None else env
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    base = f"slurm-{env['SLURM_JOB_ID']}" + (f"-r{restarts}" if restarts > 0 else "")
    reservations = _slurm_reservations()
    try:
        reservations.mkdir(parents=True, exist_ok=True)
    except OSError:
        reservations = None  # type: ignore[assignment]  # no writable tmp: the checkpoint folders alone decide
    for n in range(1, 10_000):
        job_id = base if n == 1 else f"{base}-{n}"
        if checkpoint_dir and (Path(checkpoint_dir) / job_id).exists():
            continue
        if reservations is not None:
            try:
                os.close(os.open(reservations / job_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            except OSError:
                pass
        return job_id
    return f"{base}-{uuid.uuid4().hex[:8]}"
