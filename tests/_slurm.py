"""A real two-node Slurm cluster for tests/test_slurm.py: `.ci/slurm` starts it (slurmctld here,
one slurmd per network namespace, each node with its own hostname and /tmp); these helpers submit,
watch and read jobs with Slurm's own commands.

    root ns  hvdksl0 10.78.0.1: slurmctld, sbatch/salloc/srun ── netns hvdkit-sl1 10.78.0.11: slurmd
                                                               ── netns hvdkit-sl2 10.78.0.12: slurmd

The nodes share this machine's filesystem (same venv, same checkout) except /tmp, which each node
has to itself: whatever a job and the test both read (the MLflow store, the batch script, the job's
output) lives under /var/tmp (``shared_dir``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, wait_until

NODES = ("hvdkit-sl1", "hvdkit-sl2")
PARTITION = "debug"
CLUSTER = "hvdkit"
SHARED_BASE = Path("/var/tmp")
# a job that is over: Slurm keeps its record MinJobAge (300 s) after it ends
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}


@dataclass
class SlurmCluster:
    conf: Path
    log_dir: Path
    nodes: tuple[str, ...] = NODES

    def env(self, **extra: str) -> dict[str, str]:
        from conftest import worker_env

        return worker_env(SLURM_CONF=str(self.conf), **extra)


def start_cluster() -> SlurmCluster:
    """Run .ci/slurm (idempotent; installs Slurm on a fresh machine) and return what it printed."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests need root (.ci/slurm installs Slurm and builds network namespaces)")
    res = subprocess.run(["bash", str(REPO / ".ci" / "slurm")], capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f".ci/slurm exited {res.returncode}:\n{res.stderr[-4000:]}"
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("SLURM_CONF="), res.stdout
    conf = Path(last.split("=", 1)[1])
    return SlurmCluster(conf=conf, log_dir=conf.parent / "log")


def slurm(cluster: SlurmCluster, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=cluster.env(),
                         stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def squeue(cluster: SlurmCluster) -> list[str]:
    """Every job Slurm still has queued or running: 'id state name' lines."""
    return [ln for ln in slurm(cluster, "squeue", "-h", "-o", "%i %T %j").stdout.splitlines() if ln.strip()]


def job_info(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict (JobState, SubmitTime, NodeList, ExitCode, ...)."""
    out = slurm(cluster, "scontrol", "show", "job", "-o", job_id).stdout.strip()
    info = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            info.setdefault(k, v)
    return info


def wait_job(cluster: SlurmCluster, job_id: str, timeout: float, until: set[str] = ENDED) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    info = job_info(cluster, job_id)
    while info.get("JobState") not in until:
        if time.monotonic() > deadline:
            raise AssertionError(f"Slurm job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
        time.sleep(0.25)  # a state poll is one scontrol call
        info = job_info(cluster, job_id)
    return info


def wait_requeued(cluster: SlurmCluster, job_id: str, timeout: float = 120) -> dict[str, str]:
    """After `scontrol requeue`: the job's state once its old run is gone (every process of it
    ended): PENDING, or RUNNING again, or over."""
    seen_leave = False  # RUNNING only counts once the old run was seen ending (COMPLETING)

    def requeued():
        nonlocal seen_leave
        info = job_info(cluster, job_id)
        state = info.get("JobState")
        seen_leave = seen_leave or state != "RUNNING"
        return info if state == "PENDING" or state in ENDED or (state == "RUNNING" and seen_leave) else None

    return wait_until(requeued, timeout, f"Slurm job {job_id} requeued", interval=0.25)


def start_now(cluster: SlurmCluster, job_id: str) -> None:
    """A requeued job waits PENDING (Reason=BeginTime) for cred_expire + 1 s (121 s by default)
    before Slurm starts it again: make it eligible at once. Call it once the job is PENDING: set
    while it is still COMPLETING, the requeue overwrites the start time again."""
    slurm(cluster, "scontrol", "update", f"JobId={job_id}", "StartTime=now")


def submitted_job_id(text: str) -> str | None:
    """The job id `hvdkit sbatch --submit` printed: 'Submitted batch job N' or a bare N line."""
    m = re.search(r"Submitted batch job (\d+)", text)
    if m:
        return m.group(1)
    bare = [ln.strip() for ln in text.splitlines() if re.fullmatch(r"\d+", ln.strip())]
    return bare[-1] if bare else None


def hostnames(cluster: SlurmCluster, nodelist: str) -> list[str]:
    return slurm(cluster, "scontrol", "show", "hostnames", nodelist).stdout.split()


def steps_launched(cluster: SlurmCluster, job_id: str) -> list[str]:
    """The job's steps any slurmd was asked to launch (its log's 'launch task StepId=J.S' lines)."""
    found = []
    for log in sorted(cluster.log_dir.glob("slurmd-*.log")):
        found += [ln for ln in log.read_text(errors="replace").splitlines() if f"launch task StepId={job_id}." in ln]
    return found


def node_processes(cluster: SlurmCluster) -> list[str]:
    """Processes left in the nodes' network namespaces other than the slurmds themselves."""
    left = []
    for node in cluster.nodes:
        res = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=30)
        for pid in res.stdout.split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if cmd and not cmd.startswith("slurmd "):
                left.append(f"{node} {pid} {cmd[:120]}")
    return left


def job_output(path: Path, limit: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as e:
        return f"({path}: {e})"


def shared_dir(prefix: str) -> Path:
    """A fresh directory every node and this test see (not /tmp: each node has its own)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SHARED_BASE))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def runs_of(uri: str, experiment: str | None = None):
    """All runs in the store (every experiment, or one), as MLflow Run objects."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    return client, (client.search_runs(ids, max_results=1000) if ids else [])


def first_metric_ms(client, runs) -> int | None:
    """The earliest timestamp (ms) of any metric point the given runs hold."""
    stamps = []
    for r in runs:
        for key in r.data.metrics:
            stamps += [m.timestamp for m in client.get_metric_history(r.info.run_id, key)]
    return min(stamps) if stamps else None
