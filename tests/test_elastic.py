"""Elastic training with membership tracked, for real: `hvdkit run --min-np 2 --max-np 3
--host-discovery-script S` on Horovod elastic (Gloo), localhost (2 slots) and 127.0.0.1 (1 slot)
as two hosts, as Horovod's own elastic tests do. A kill schedule SIGKILLs the worker on
127.0.0.1 once training runs at 3 ranks: training goes on at 2; after the blacklist cool-down the
host comes back and the job trains at 3 again. It stays one MLflow job, read back from the store:
``world_size`` 3 -> 2 -> 3, one membership event per change, a child run for the worker that
joined, the lost worker's run ended KILLED, throughput and scaling efficiency per membership
epoch (against an np=1 baseline run of the same recipe).

The recipe is paced (its forward sleeps STEP_S): from the kill until the host's new worker starts
the test slows it to SLOW_S, so the job outlasts the failure detection (Gloo's 30 s timeout: no
step runs meanwhile), the cool-down and the rejoin on any machine; then STEP_S again to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from _paced import write_paced_recipe
from conftest import BIN, explain, hvdkit, sqlite_store, wait_until, worker_env
from hvdkit.tracking import keys

pytestmark = [pytest.mark.slow, pytest.mark.horovod]

STEPS = 150  # the kill came at steps 30-40, the rejoin 10-30 later; the rest is room at SLOW_S
LOG_EVERY = 10
STEP_S = 0.05
SLOW_S = 0.3  # from the kill to the new worker's start: 100 steps outlast 30+ s of cool-down and rejoin
KILL_AT_GATHERS = 3  # the parent's world_size points at 3 ranks before the kill
VICTIM_HOST = "127.0.0.1"



def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri):
    client = _client(uri)
    exp = client.get_experiment_by_name("hvdkit")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _workers(root_pid: int) -> dict[int, tuple[str, str]]:
    """pid -> (HOROVOD_HOSTNAME, HOROVOD_RANK at its start) of the job's worker processes."""
    out = {}
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            if "hvdkit.train" in " ".join(p.cmdline()):
                env = p.environ()
                if env.get("HOROVOD_HOSTNAME"):
                    out[p.pid] = (env["HOROVOD_HOSTNAME"], env.get("HOROVOD_RANK", ""))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _parent_world_sizes(uri) -> list[float]:
    try:
        parents = [r for r in _runs(uri) if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT
                   and r.data.tags.get(keys.TAG_ELASTIC) == "true"]
        if not parents:
            return []
        hist = _client(uri).get_metric_history(parents[0].info.run_id, keys.WORLD_SIZE)
        return [m.value for m in sorted(hist, key=lambda m: m.step)]
    except Exception:  # noqa: BLE001 - the store is being created; not there yet
        return []


# Each framework once and each kind of victim once (CI time): a worker that is not the writer (TF),
# and rank 0, whose survivor takes the writer over (torch).
@pytest.mark.parametrize("framework,victim_rank", [("tensorflow", 2), ("torch", 0)],
                         ids=["tensorflow-rank2", "torch-rank0"])
def test_elastic_job_survives_a_killed_worker_and_takes_it_back(tmp_path, framework, victim_rank):
    """VICTIM_HOST has one slot; hvdkit ranks hosts in the order the discovery lists them, so
    listed last it holds rank 2, listed first rank 0: then the job's writer dies with it and a
    survivor, the new rank 0, writes the same runs from there on."""
    uri = sqlite_store(tmp_path)
    env = worker_env(MLFLOW_TRACKING_URI=uri)
    pace = tmp_path / "pace"  # the recipe's sleep per forward while there (STEP_S when not)
    recipe = write_paced_recipe(tmp_path / "paced.py", name="paced-elastic", steps=STEPS, log_every=LOG_EVERY, step_s=STEP_S,
                                batch_size=16, evaluate=True, pace_file=pace)
    hosts = tmp_path / "hosts.txt"
    listed = ["localhost:2", f"{VICTIM_HOST}:1"]
    hosts.write_text("\n".join(listed if victim_rank == 2 else listed[::-1]) + "\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)

    # the np=1 baseline scaling efficiency divides by (same recipe, framework, batch, machine)
    base = hvdkit(["run", str(recipe), "-np", "1", "--framework", framework, "steps=50"], cwd=tmp_path, env=env)
    assert base.returncode == 0, explain(base)

    out, err = tmp_path / "job.out", tmp_path / "job.err"
    # cool-down 3-5 s, not 1: a host update Horovod sends before the survivors' reset ends is dropped
    cmd = [str(BIN / "hvdkit"), "run", str(recipe), "--framework", framework, "-np", "3", "--min-np", "2",
           "--max-np", "3", "--host-discovery-script", str(discover), "--blacklist-cooldown-range", "3", "5"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=o, stderr=e)
    t0 = time.monotonic()
    at = {}  # phase -> seconds since the job's start, for the summary line

    def ended():
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def victim_at_3():  # the kill schedule: once the job trains at 3 ranks
        assert proc.poll() is None, explain(ended())
        if _parent_world_sizes(uri).count(3.0) >= KILL_AT_GATHERS:
            return next((pid for pid, host in _workers(proc.pid).items() if host[0] == VICTIM_HOST), None)

    def joiner_started():  # the driver starts it once the survivors left training at 2 ranks for good
        if "failure" not in at and "membership epoch 1" in err.read_text(errors="replace"):
            at["failure"] = time.monotonic() - t0
        return proc.poll() is not None or any(pid != victim and host[0] == VICTIM_HOST for pid, host in _workers(proc.pid).items())

    try:
        victim = wait_until(victim_at_3, timeout=300, what="the job training at 3 ranks", interval=0.5)
        assert _workers(proc.pid)[victim][1] == str(victim_rank)  # hosts ranked in the order listed
        os.kill(victim, signal.SIGKILL)
        at["kill"] = time.monotonic() - t0
        tmp = pace.with_suffix(".tmp")
        tmp.write_text(str(SLOW_S))
        tmp.replace(pace)  # atomic: a forward never reads half a number
        wait_until(joiner_started, timeout=300, what="a new worker on the killed worker's host", interval=0.2)
        at["joiner"] = time.monotonic() - t0
        pace.unlink()  # STEP_S again: the joined epoch is paced as the first one and the baseline
        wait_until(lambda: proc.poll() is not None or "membership epoch 2" in err.read_text(errors="replace"),
                   timeout=300, what="the job back at 3 ranks", interval=0.2)
        at["back"] = time.monotonic() - t0
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    res = ended()
    wall = time.monotonic() - t0
    assert rc == 0, explain(res)
    assert "membership epoch 1" in res.stderr and "membership epoch 2" in res.stderr, explain(res)
    assert ("rank 0's process was lost" in res.stderr) == (victim_rank == 0), explain(res)

    client = _client(uri)
    runs = [r for r in _runs(uri) if r.data.tags.get(keys.TAG_ELASTIC) == "true"
            or r.data.tags.get(keys.TAG_WORKER)]
    (parent,) = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    children = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK]
    assert parent.info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert parent.data.tags[keys.TAG_MEMBERSHIP_CHANGES] == "2"

    # world_size as a series: 3, then 2 after the kill, then 3 again once the host is back
    sizes = [m.value for m in sorted(client.get_metric_history(parent.info.run_id, keys.WORLD_SIZE), key=lambda m: m.step)]
    collapsed = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert collapsed == [3.0, 2.0, 3.0], collapsed
    # one membership event per change, at the step of the change
    events = sorted(client.get_metric_history(parent.info.run_id, keys.MEMBERSHIP_EPOCH), key=lambda m: m.step)
    assert [m.value for m in events] == [0.0, 1.0, 2.0]
    left = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.MEMBERSHIP_LEFT)}
    joined = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.MEMBERSHIP_JOINED)}
    s0, s1, s2 = (m.step for m in events)
    assert s0 == 0 < s1 < s2 < STEPS
    assert (left[s1], joined[s1], left[s2], joined[s2]) == (1.0, 0.0, 0.0, 1.0)

    # child runs: the three first workers, and the one that joined; the lost one ended KILLED
    assert len(children) == 4, [(c.info.run_name, c.info.status) for c in children]
    lost = [c for c in children if c.info.status == "KILLED"]
    assert len(lost) == 1 and lost[0].data.tags[keys.TAG_HOST] == VICTIM_HOST
    assert lost[0].data.tags[keys.TAG_LEFT_REASON] == "failure" and lost[0].data.tags[keys.TAG_LEFT_STEP] == str(s1)
    joiner = [c for c in children if c.data.tags.get(keys.TAG_JOINED_STEP) == str(s2)]
    assert len(joiner) == 1 and joiner[0].info.status == "FINISHED" and joiner[0].data.tags[keys.TAG_HOST] == VICTIM_HOST
    assert joiner[0].data.tags[keys.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
    assert {c.data.tags[keys.TAG_JOB_ID] for c in children} == {parent.data.tags[keys.TAG_JOB_ID]}
    joined_steps = sorted(m.step for m in client.get_metric_history(joiner[0].info.run_id, keys.SAMPLES_PER_SEC))
    assert joined_steps and min(joined_steps) > s2  # it logs from when it joined
    # every step of the job was trained: the parent's loss series reaches the last step
    assert max(m.step for m in client.get_metric_history(parent.info.run_id, keys.LOSS)) == STEPS

    # throughput and scaling efficiency per membership epoch, at each epoch's first step
    tput = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.MEMBERSHIP_SAMPLES_PER_SEC)}
    eff = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.MEMBERSHIP_SCALING_EFFICIENCY)}
    assert sorted(tput) == sorted(eff) == [s0, s1, s2], (tput, eff)
    assert all(t > 0 for t in tput.values()) and all(0 < e <= 1.5 for e in eff.values()), (tput, eff)
    # the record of every epoch, as an artifact
    record = json.loads(Path(client.download_artifacts(parent.info.run_id, keys.MEMBERSHIP_ARTIFACT, str(tmp_path))).read_text())
    assert [e["size"] for e in record["epochs"]] == [3, 2, 3]
    assert [e["reason"] for e in record["epochs"]] == ["start", "failure", "hosts_updated"]
    assert record["epochs"][1]["hosts"] == ["localhost"] and record["epochs"][2]["hosts"] == sorted(["localhost", VICTIM_HOST])
    print(f"elastic {framework}, rank {victim_rank} killed: {wall:.0f} s, changes at steps {s1} (3->2) and {s2} (2->3); "
          f"T per epoch {[round(tput[s]) for s in (s0, s1, s2)]} samples/s, E {[round(eff[s], 2) for s in (s0, s1, s2)]}; "
          f"s after start: {', '.join(f'{k} {v:.0f}' for k, v in at.items())}")
