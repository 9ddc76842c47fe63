"""The launcher's environment as every rank sees it: rank, size, local rank and size, host, Slurm job.

Read by the run context provider (``context``, which MLflow loads) and by ``World`` on every
rank; it imports no MLflow, so a rank that does not write runs never imports MLflow for it.
"""

from __future__ import annotations

import os
import socket

# Per launcher: (rank, size, local_rank, local_size). Gloo (horovodrun's default) first, then
# the MPI flavours horovodrun --mpi may use.
_GLOO = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE")
_MPI = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI (hydra)
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)

# A task of `srun --mpi=pmix` (hvdkit run inside a Slurm allocation, hvdkit.launch.slurm): PMIx puts
# only PMIX_RANK in the environment, Slurm the rest. Local size is not a variable of its own: it
# is this node's entry of SLURM_STEP_TASKS_PER_NODE (see _slurm_local_size).
_SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE")

# The Slurm job a Horovod launch runs in (any launcher: srun, or horovodrun inside an allocation).
SLURM_TAGS = (("slurm.job_id", "SLURM_JOB_ID"), ("slurm.partition", "SLURM_JOB_PARTITION"),
              ("slurm.nodelist", "SLURM_JOB_NODELIST"), ("slurm.cluster", "SLURM_CLUSTER_NAME"))
TAG_SLURM_JOB_ID = "slurm.job_id"

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
    if _MPI[0][0] in env:
        return "mpi", _MPI[0]
    if _is_slurm_task(env):
        return "mpi", _SLURM
    for names in _MPI[1:]:
        if names[0] in env:
            return "mpi", names
    return None


def _is_slurm_task(env) -> bool:
    # A task of an srun step with an MPI plugin, not the batch script (which has SLURM_PROCID=0
    # too, but no PMI rank).
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ("PMIX_RANK" in env or "PMI_RANK" in env)


def _slurm_local_size(env) -> str:
    """This node's task count: entry SLURM_NODEID of SLURM_STEP_TASKS_PER_NODE ("2(x3),1"; the
    same grammar hvdkit.launch.slurm.parse_tasks_per_node reads, which sits in a layer above this one)."""
    counts: list[str] = []
    for part in filter(None, env.get("SLURM_STEP_TASKS_PER_NODE", "").split(",")):
        n, _, times = part.partition("(x")
        counts += [n] * (int(times.rstrip(")")) if times else 1)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    return counts[node] if 0 <= node < len(counts) else ""


def launch_value(env, var: str) -> str:
    """The value of one of _launch()'s variable names in ``env`` ("" when unset)."""
    if var == "SLURM_STEP_TASKS_PER_NODE":
        return _slurm_local_size(env)
    if var == "SLURM_STEP_NUM_TASKS":
        return env.get(var) or env.get("SLURM_NTASKS", "")
    return env.get(var, "")


def launch_rank() -> int | None:
    """This process's rank as its launcher numbered it, before ``hvd.init``; None outside a launch."""
    launch = _launch()
    if launch is None:
        return None
    value = launch_value(os.environ, launch[1][0]).strip()
    return int(value) if value.isdigit() else None


def rank_hostname(env=None) -> str:
    """This rank's host as the launcher names it: horovodrun's HOROVOD_HOSTNAME, the Slurm node
    of an srun task (slurmd's name for it: nodes that share a kernel's hostname, e.g. several
    slurmds on one machine, still differ), else the kernel's hostname."""
    env = os.environ if env is None else env
    if env.get("HOROVOD_HOSTNAME"):
        return env["HOROVOD_HOSTNAME"]
    if _is_slurm_task(env) and env.get("SLURMD_NODENAME"):
        return env["SLURMD_NODENAME"]
    return socket.gethostname()


def slurm_tags(env=None) -> dict[str, str]:
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return {}
    return {tag: env[var] for tag, var in SLURM_TAGS if env.get(var)}


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
        if launch_value(env, var).strip():
            tags[tag] = launch_value(env, var).strip()
    tags[TAG_HOSTNAME] = rank_hostname(env)
    tags.update(slurm_tags(env))
    v = _horovod_version()
    if v:
        tags[TAG_VERSION] = v
    return tags
