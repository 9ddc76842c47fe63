"""hvdkit on a real Slurm cluster: two slurmd nodes (network namespaces with their own hostnames)
and a slurmctld on this machine, started by `.ci/slurm` (tests/_slurm.py).

- the cluster itself: `srun --mpi=pmix -N 2 -n 2` starts Horovod across both nodes (no hvdkit);
- `hvdkit sbatch ... --submit`: digits trains on 2 ranks, one per node, and the runs land with the
  Slurm tags and both hostnames; the time from sbatch to the first training step is printed;
- `scancel` in the middle of a job leaves every run KILLED; `scontrol requeue` of an `--requeue` job
  continues the same runs from the last checkpoint;
- an allocation smaller than -np, an unknown partition, more tasks per node than a node has CPUs:
  one line, exit 2, nothing started or submitted.

Needs root (skipped otherwise). The jobs' shared files live under /var/tmp: each node has its own /tmp.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from _paced import write_paced_recipe
from _slurm import (CLUSTER, NODES, PARTITION, first_metric_ms, hostnames, job_info, job_output, node_processes,
                    remove, runs_of, shared_dir, slurm, squeue, start_cluster, start_now, steps_launched,
                    submitted_job_id, wait_job, wait_requeued)
from conftest import BIN, REPO, explain, hvdkit, sqlite_store, wait_until

pytestmark = [pytest.mark.system, pytest.mark.slow]

DIGITS = REPO / "recipes" / "digits.yaml"


@pytest.fixture(scope="session")
def cluster():
    c = start_cluster()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)
    yield c
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture
def work():
    d = shared_dir("hvdkit-slurm-test-")
    yield d
    remove(d)


def _quiet_queue(cluster, timeout: float = 120) -> None:
    """Let jobs of an earlier test, or of someone else on this cluster, leave the nodes first (a job
    submitted meanwhile waits in the queue: the tests' own waits cover that)."""
    deadline = time.monotonic() + timeout
    while squeue(cluster) and time.monotonic() < deadline:
        time.sleep(0.25)


def _job_name(what: str) -> str:
    return f"hvdkit-test-{what}-{os.getpid()}-{time.monotonic_ns() % 10**6}"


def _error_lines(text: str) -> list[str]:
    noise = ("oneDNN custom operations", "cpu_feature_guard", "To enable the following instructions",
             "absl::InitializeLog", "salloc:")
    return [ln for ln in text.splitlines() if ln.strip() and not any(n in ln for n in noise)]


# -- the cluster, without hvdkit ---------------------------------------------------------------
ALLREDUCE = """
import socket, torch, horovod.torch as hvd
hvd.init()
t = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
print("RESULT", hvd.rank(), hvd.size(), socket.gethostname(), t.item(), hvd.mpi_enabled(), flush=True)
"""


def test_srun_pmix_starts_horovod_across_both_nodes(cluster, work):
    res = slurm(cluster, "srun", "--mpi=pmix", "-N", "2", "-n", "2", "--chdir", str(work), str(BIN / "python"),
                "-c", ALLREDUCE, timeout=180, check=False)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    rows = sorted(ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    assert [r[0] for r in rows] == ["0", "1"], res.stdout
    assert all(r[1] == "2" for r in rows), res.stdout  # size 2
    assert sorted(r[2] for r in rows) == sorted(NODES), res.stdout  # one rank on each node
    assert all(float(r[3]) == 3.0 for r in rows), res.stdout  # 1 + 2
    assert all(r[4] == "True" for r in rows), res.stdout  # Horovod's MPI controller, from PMIx


# -- hvdkit sbatch: a job across both nodes ----------------------------------------------------
def test_sbatch_trains_across_both_nodes_and_the_runs_carry_slurm_tags(cluster, work):
    _quiet_queue(cluster)
    uri = sqlite_store(work)
    env = cluster.env(MLFLOW_TRACKING_URI=uri)
    script = work / "digits.sbatch"
    t_submit = time.time()
    res = hvdkit(["sbatch", str(DIGITS), "-N", "2", "--ntasks-per-node", "1", "--partition", PARTITION,
                  "--job-name", _job_name("digits"), "--script", str(script), "--experiment", "slurm-digits", "--submit",
                  f"checkpoint.dir={work / 'ckpt'}"], cwd=work, env=env, timeout=120)
    assert res.returncode == 0, explain(res)
    job_id = submitted_job_id(res.stdout)
    assert job_id, f"no job id in hvdkit sbatch's output:\n{res.stdout}"
    assert "#SBATCH" in res.stdout and "hvdkit run" in res.stdout, res.stdout  # the script, printed
    text = script.read_text()
    assert text.startswith("#!") and "#SBATCH" in text and "hvdkit run" in text, text

    info = wait_job(cluster, job_id, timeout=600)
    out = job_output(Path(info.get("StdOut", str(work / f"slurm-{job_id}.out"))))
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} exit {info.get('ExitCode')}\n{out}"
    assert sorted(hostnames(cluster, info["NodeList"])) == sorted(NODES), info["NodeList"]
    assert steps_launched(cluster, job_id), "no srun step in the slurmd logs"  # (the check test_np_... relies on)

    client, runs = runs_of(uri, "slurm-digits")
    parents = [r for r in runs if r.data.tags.get("hvdkit.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hvdkit.role") == "rank"]
    assert len(parents) == 1 and len(children) == 2, ([r.data.tags.get("hvdkit.role") for r in runs], out)
    parent = parents[0]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("hvdkit.role"), r.info.status) for r in runs]
    tags = parent.data.tags
    assert tags.get("slurm.job_id") == job_id, tags
    assert tags.get("slurm.partition") == PARTITION, tags
    assert tags.get("slurm.cluster") == CLUSTER, tags
    assert sorted(hostnames(cluster, tags.get("slurm.nodelist", ""))) == sorted(NODES), tags
    assert sorted(c.data.tags.get("hvdkit.host") for c in children) == sorted(NODES), [c.data.tags for c in children]
    assert all(c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children)
    assert parent.data.metrics.get("val_accuracy", 0) >= 0.95, parent.data.metrics

    first_ms = first_metric_ms(client, children)
    assert first_ms is not None, "the child runs hold no metric"
    start = _slurm_time(info.get("StartTime", ""))
    load = os.getloadavg()[0]
    print(f"\nslurm job {job_id}: hvdkit sbatch -> first training step (earliest child metric) "
          f"{first_ms / 1000 - t_submit:.1f} s, of which Slurm start -> first step "
          f"{first_ms / 1000 - start:.1f} s (SubmitTime {info.get('SubmitTime')}, StartTime {info.get('StartTime')}, "
          f"EndTime {info.get('EndTime')}; load average {load:.1f}); val_accuracy {parent.data.metrics['val_accuracy']:.4f}")


def _slurm_time(stamp: str) -> float:
    """Slurm's local 'YYYY-MM-DDTHH:MM:SS' as seconds since the epoch."""
    import datetime

    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").timestamp()


# -- scancel in the middle of a job ------------------------------------------------------------
def test_scancel_ends_every_run_killed(cluster, work):
    _quiet_queue(cluster)
    uri = sqlite_store(work)
    env = cluster.env(MLFLOW_TRACKING_URI=uri)
    recipe = write_paced_recipe(work / "paced.py", name="paced", steps=3000, log_every=5, step_s=0.05)
    res = hvdkit(["sbatch", str(recipe), "-N", "2", "--ntasks-per-node", "1", "--script", str(work / "paced.sbatch"),
                  "--job-name", _job_name("cancel"), "--experiment", "slurm-cancel", "--submit"], cwd=work, env=env, timeout=120)
    assert res.returncode == 0, explain(res)
    job_id = submitted_job_id(res.stdout)
    assert job_id, res.stdout

    # training under way: both children have stored metrics
    deadline = time.monotonic() + 600
    while True:
        info = job_info(cluster, job_id)
        assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (info, job_output(work / f"slurm-{job_id}.out"))
        try:
            _, runs = runs_of(uri, "slurm-cancel")
        except Exception:  # the store is being created
            runs = []
        children = [r for r in runs if r.data.tags.get("hvdkit.role") == "rank"]
        if len(children) == 2 and all(c.data.metrics for c in children):
            break
        assert time.monotonic() < deadline, f"no metrics after 600 s: {info}\n{job_output(work / f'slurm-{job_id}.out')}"
        time.sleep(0.5)

    slurm(cluster, "scancel", job_id)
    info = wait_job(cluster, job_id, timeout=120)
    assert info["JobState"] == "CANCELLED", info
    # every run ended KILLED; nothing is left RUNNING (a short grace for the last store writes)
    deadline = time.monotonic() + 20
    while True:
        _, runs = runs_of(uri, "slurm-cancel")
        statuses = sorted((r.data.tags.get("hvdkit.role", "?"), r.info.status) for r in runs)
        if len(runs) == 3 and all(s == "KILLED" for _, s in statuses) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(runs) == 3 and all(s == "KILLED" for _, s in statuses), (statuses, job_output(work / f"slurm-{job_id}.out"))
    deadline = time.monotonic() + 15
    while node_processes(cluster) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not node_processes(cluster), node_processes(cluster)  # no rank left on either node


# Every step sleeps 0.05 s, so on any machine the job trains >= 20 s past its first checkpoint
# (epoch 1, ~23 steps): it is still running when the test requeues it. (optimizer.momentum=0.9
# below: its linear model reaches val_accuracy 0.96 in these steps; 0.9499 without.)
REQUEUE_STEPS = 450


def test_requeued_job_continues_the_same_runs_from_its_last_checkpoint(cluster, work):
    """`hvdkit sbatch --requeue`, then `scontrol requeue` once checkpoints exist (what preemption or a
    lost node does): Slurm starts the script again (SLURM_RESTART_COUNT=1), and hvdkit continues the
    same job and the same MLflow runs from the last checkpoint, which end FINISHED."""
    _quiet_queue(cluster)
    uri = sqlite_store(work)
    env = cluster.env(MLFLOW_TRACKING_URI=uri)
    ckpt = work / "ckpt"
    recipe = write_paced_recipe(work / "paced.py", name="paced-requeue", steps=REQUEUE_STEPS, log_every=10,
                                step_s=0.05, evaluate=True)
    res = hvdkit(["sbatch", str(recipe), "-N", "2", "--ntasks-per-node", "1", "--requeue", "--script",
                  str(work / "requeue.sbatch"), "--job-name", _job_name("requeue"), "--experiment", "slurm-requeue",
                  "--submit", "checkpoint.every_epochs=1", "optimizer.momentum=0.9", f"checkpoint.dir={ckpt}",
                  f"eval.every_epochs={REQUEUE_STEPS}"],  # once: after the last epoch (its forwards sleep too)
                 cwd=work, env=env, timeout=120)
    assert res.returncode == 0, explain(res)
    job_id = submitted_job_id(res.stdout)
    assert job_id and "#SBATCH --requeue" in (work / "requeue.sbatch").read_text()
    folder = ckpt / f"slurm-{job_id}"
    t0 = time.monotonic()

    def checkpoint_and_runs():
        info = job_info(cluster, job_id)
        assert info["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), (info, job_output(work / f"slurm-{job_id}.out"))
        if not list(folder.glob("ckpt-e*.pt")):
            return None
        # the runs reach the store asynchronously, maybe after the checkpoint: "the same runs" needs them
        try:
            _, runs = runs_of(uri, "slurm-requeue")
        except Exception:  # the job is writing to the store
            return None
        return runs if len(runs) == 3 else None

    before = wait_until(checkpoint_and_runs, 600, "a checkpoint and the job's 3 runs in the store", interval=0.25)
    t_ckpt = time.monotonic()
    slurm(cluster, "scontrol", "requeue", job_id)
    info = wait_requeued(cluster, job_id)
    # the old run is gone and the new one not started: these are the checkpoints it resumes from
    written = sorted(p.name for p in folder.glob("ckpt-e*.pt"))
    t_requeued = time.monotonic()
    if info["JobState"] == "PENDING":
        start_now(cluster, job_id)
    info = wait_job(cluster, job_id, timeout=900, until={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    t_end = time.monotonic()
    out = job_output(work / f"slurm-{job_id}.out")
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, out)
    assert "resuming job" in out, out
    resumed = re.search(r"resumed from[\s│]+(\S+)", out)
    assert resumed and Path(resumed.group(1)) == folder / written[-1], (written, out)
    _, runs = runs_of(uri, "slurm-requeue")
    assert sorted(r.info.run_id for r in runs) == sorted(r.info.run_id for r in before) and len(runs) == 3, \
        ([r.info.run_id for r in before], [r.info.run_id for r in runs])
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("hvdkit.role"), r.info.status) for r in runs]
    parent = next(r for r in runs if r.data.tags.get("hvdkit.role") == "parent")
    assert parent.data.tags.get("hvdkit.resumes") == "1", parent.data.tags
    assert parent.data.metrics.get("val_accuracy", 0) >= 0.95, parent.data.metrics
    print(f"\nslurm job {job_id}: submit -> checkpoint + runs stored {t_ckpt - t0:.1f} s, requeue -> old run gone "
          f"{t_requeued - t_ckpt:.1f} s, restart -> COMPLETED {t_end - t_requeued:.1f} s; resumed from {written[-1]}")


# -- bad input: nothing starts -----------------------------------------------------------------
def test_np_larger_than_the_allocation_exits_2_before_starting_anything(cluster, work):
    _quiet_queue(cluster)
    uri = sqlite_store(work)
    env = cluster.env(MLFLOW_TRACKING_URI=uri)
    idfile = work / "jobid"
    res = subprocess.run(["salloc", "-N", "1", "-n", "1", "-J", _job_name("np"), "bash", "-c",
                          f'echo "$SLURM_JOB_ID" > {idfile}; exec "$0" "$@"', str(BIN / "hvdkit"),
                          "run", str(DIGITS), "-np", "2", f"checkpoint.dir={work / 'ckpt'}"],
                         capture_output=True, text=True, timeout=900, cwd=work, env=env, stdin=subprocess.DEVNULL)
    job_id = idfile.read_text().strip()
    lines = _error_lines(res.stdout + res.stderr)
    assert res.returncode == 2, explain(res)
    assert len(lines) == 1, lines
    assert "2" in lines[0] and "1" in lines[0], lines
    assert not steps_launched(cluster, job_id), steps_launched(cluster, job_id)
    _, runs = runs_of(uri) if (work / "mlflow.db").exists() else (None, [])
    assert not runs, [(r.info.run_id, r.info.status) for r in runs]


@pytest.mark.parametrize("bad, expect", [
    (["--partition", "nosuch"], "nosuch"),
    (["--ntasks-per-node", "3"], None),  # a node has 2 CPUs: Slurm's own error, passed through
], ids=["unknown-partition", "more-tasks-than-cpus"])
def test_sbatch_bad_input_is_one_line_and_submits_nothing(cluster, work, bad, expect):
    env = cluster.env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    name = _job_name("bad")
    args = ["sbatch", str(DIGITS), "-N", "1", "--ntasks-per-node", "1", "--script", str(work / "bad.sbatch"),
            "--job-name", name, "--submit"]
    for i in range(0, len(bad), 2):  # replace or add the option
        if bad[i] in args:
            args[args.index(bad[i]) + 1] = bad[i + 1]
        else:
            args += bad[i:i + 2]
    res = hvdkit(args, cwd=work, env=env, timeout=120)
    assert res.returncode == 2, explain(res)
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, lines
    if expect:
        assert expect in lines[0], lines
    assert submitted_job_id(res.stdout) is None, res.stdout
    # nothing queued or run under the job's name (Slurm may keep a record of a refused submission,
    # e.g. FAILED with Reason=BadConstraints, that never ran: no batch host, no output file)
    assert not slurm(cluster, "squeue", "-h", "-n", name).stdout.strip()
    records = [ln for ln in slurm(cluster, "scontrol", "show", "job", "-o", check=False).stdout.splitlines()
               if f"JobName={name} " in ln]
    assert not any("BatchHost=" in ln for ln in records), records
    assert not list(work.glob("slurm-*.out")), list(work.glob("slurm-*.out"))
