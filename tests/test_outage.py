"""A tracking-server outage, for real: mlflow/server.sh on PostgreSQL, stopped in the middle of a
2-rank `hvdkit run`.

* Back after OUTAGE_S: the job ends 0, every run FINISHED, and the store holds exactly the metric
  points the job produced, those logged while the server was down included, none twice.
* Never back while the job runs: the job still ends 0 within the close timeout of its last step
  and names its spool; once the server is up again, `hvdkit sync` delivers every point, and a
  second sync applies nothing.

"Produced" is counted from the job itself, not from the store: the tracker gathers every
LOG_EVERY steps and once more for a partial last interval, so each key of each run must hold one
point at each of those steps (the Summary's step count is checked against the recipe's). The
recipe is paced (its forward sleeps STEP_S), so the job's length does not depend on the machine's
speed or load. Throughput during an outage is a speed goal: bench/outage.py measures it.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _paced import write_paced_recipe
from _server import Server, drop_database, free_port, launch, listening, postgres_uri, session_pids, stop, wait_healthy
from conftest import BIN, hvdkit, worker_env
from hvdkit.tracking import keys

OUTAGE_S = 60  # how long the server stays down in the first test (the figure)
STEP_S = 0.02  # the paced recipe's sleep per forward pass
LOG_EVERY = 10
STEPS_OUTAGE = 5000  # ~110 s of training: outlasts the outage and the server's restart
STEPS_DEAD = 1500  # ~35 s of training
CLOSE_TIMEOUT_S = 30.0  # TrackingConfig.close_timeout_s: what a dead store may add to a job's end
PARENT_KEYS = {keys.WORLD_SIZE, keys.SAMPLES_PER_SEC, keys.LOSS, keys.STRAGGLER_RATIO}

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.horovod]



# -- the server, stopped and started again on the same port and database -------------------------
class OutageServer(Server):
    tmp: Path
    user: tuple[str, str]

    def down(self) -> None:
        stop(self.proc)
        assert not session_pids(self.proc.pid) and not listening(self.port), "the server did not stop"

    def up(self) -> float:
        """Start it again (no-op when it runs); seconds until healthy."""
        if self.proc.poll() is None:
            return 0.0
        self.proc = launch(self.db_uri, self.port, self.admin, self.tmp, self.log)
        return wait_healthy(self, 240)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> OutageServer:
    tmp = tmp_path_factory.mktemp("mlflow-outage")
    db = f"mlflow_outage_{secrets.token_hex(4)}"
    db_uri = postgres_uri(db)
    port = free_port()
    admin = ("admin", "adm-" + secrets.token_urlsafe(18))
    log = tmp / "server.log"
    srv = OutageServer(f"http://127.0.0.1:{port}", port, admin, db_uri, launch(db_uri, port, admin, tmp, log), log,
                       tmp / "artifacts")
    srv.tmp = tmp
    try:
        wait_healthy(srv, 240)
        srv.user = ("trainer", "trn-" + secrets.token_urlsafe(18))
        srv.api("POST", "/api/2.0/mlflow/users/create", {"username": srv.user[0], "password": srv.user[1]})
        yield srv
    finally:
        stop(srv.proc)
        left = session_pids(srv.proc.pid)
        drop_database(db_uri, db)
        assert not left, f"server processes left running: {left}"


# -- helpers -------------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


def _gather_steps(steps: int) -> list[int]:
    """Where the tracker gathers: every LOG_EVERY steps, plus the partial last interval."""
    out = list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    if steps % LOG_EVERY:
        out.append(steps)
    return out


def _job_env(srv: OutageServer, **extra: str) -> dict[str, str]:
    return worker_env(MLFLOW_TRACKING_URI=srv.url, MLFLOW_TRACKING_USERNAME=srv.user[0],
                      MLFLOW_TRACKING_PASSWORD=srv.user[1], **extra)


class Job:
    """`hvdkit run` of the paced recipe in the background, output to files in ``tmp``."""

    def __init__(self, srv: OutageServer, tmp: Path, steps: int, experiment: str) -> None:
        self.tmp, self.steps, self.experiment = tmp, steps, experiment
        recipe = write_paced_recipe(tmp / "paced.py", name="paced", steps=steps, log_every=LOG_EVERY, step_s=STEP_S)
        self.summary = tmp / "summary.json"
        self.out, self.err = tmp / "job.out", tmp / "job.err"
        env = _job_env(srv)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([str(BIN / "hvdkit"), "run", str(recipe), "-np", "2", "--framework", "torch",
                                          "--experiment", experiment, "--summary-json", str(self.summary)], cwd=tmp, env=env, stdout=out, stderr=err)
        self.ended: float | None = None  # wall-clock time the process was seen gone

    def running(self) -> bool:
        if self.proc.poll() is not None and self.ended is None:
            self.ended = time.time()
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(30)
                pytest.fail(f"job still running after {timeout:.0f} s:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        return self.proc.returncode

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _client(srv: OutageServer, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", srv.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", srv.admin[1])
    return MlflowClient(tracking_uri=srv.url)


def _runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _wait_until_training_reaches_the_store(client, job: Job, timeout: float = 240) -> None:
    """Until the store holds the parent's first two throughput points (training is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.running(), f"the job ended before the outage began:\n{job.output()[-3000:]}"
        try:
            parents = [r for r in _runs(client, job.experiment) if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
            if parents and len(client.get_metric_history(parents[0].info.run_id, keys.SAMPLES_PER_SEC)) >= 2:
                return
        except Exception:  # noqa: BLE001 - not there yet
            pass
        time.sleep(1)
    job.kill()
    pytest.fail(f"no metrics reached the store within {timeout:.0f} s:\n{job.output()[-3000:]}")


def _stored(client, experiment: str) -> dict[str, dict[str, list[tuple[int, int, float]]]]:
    """Every stored metric point of the job's runs: {"parent" | "rank<r>": {key: [(step, ts, value)]}}.
    Checks the runs first: one parent and one child per rank, nothing created twice, all FINISHED."""
    runs = _runs(client, experiment)
    roles = Counter((r.data.tags.get(keys.TAG_ROLE), r.data.tags.get(keys.TAG_RANK)) for r in runs)
    assert roles == Counter({(keys.ROLE_PARENT, None): 1, (keys.ROLE_RANK, "0"): 1, (keys.ROLE_RANK, "1"): 1}), roles
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    out = {}
    for r in runs:
        ref = "parent" if r.data.tags[keys.TAG_ROLE] == keys.ROLE_PARENT else f"rank{r.data.tags[keys.TAG_RANK]}"
        out[ref] = {k: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                    for k in r.data.metrics}
    return out


# Per-rank keys logged at every gather (not the sparse ones; layer_comm_s only for split models).
DENSE = [k for k in keys.RANK_VECTOR if k not in keys.SPARSE_RANK_KEYS and k != keys.LAYER_COMM_S]

def _check_exact(stored: dict, steps: int) -> dict[str, int]:
    """Each key of each run holds one point per gather step: none missing, none twice. Returns
    the number of points per run."""
    expected = _gather_steps(steps)
    assert set(stored) == {"parent", "rank0", "rank1"}
    # replicas_equal and samples_per_sec_end_to_end: one point each, when training ends, not one per gather
    assert set(stored["parent"]) == PARENT_KEYS | {keys.REPLICAS_EQUAL, keys.SAMPLES_PER_SEC_END_TO_END}, sorted(stored["parent"])
    assert [v for _, _, v in stored["parent"].pop(keys.REPLICAS_EQUAL)] == [1.0]
    (end_to_end,) = stored["parent"].pop(keys.SAMPLES_PER_SEC_END_TO_END)
    assert end_to_end[0] == steps and end_to_end[2] > 0, end_to_end
    # The host's system metrics ride on its local rank 0's gathers only (one sampler per host),
    # a point per new sample: through the outage they are kept like every other key.
    system = set(stored["rank0"]) & keys.SYSTEM_RANK_KEYS
    assert keys.SYSTEM_PREFIX + "cpu_utilization_percentage" in system, sorted(stored["rank0"])
    for ref, extra in (("rank0", system), ("rank1", set())):
        assert set(stored[ref]) == set(DENSE) | {keys.PEAK_RSS_MB, keys.PARAMETERS} | extra, (ref, sorted(stored[ref]))
    for ref, by_key in stored.items():
        for key, points in by_key.items():
            if key in keys.SYSTEM_RANK_KEYS:  # a point per sample, at the gather after it
                assert len(set(points)) == len(points) and {s for s, _, _ in points} <= set(expected), (ref, key)
                continue
            if key in keys.SPARSE_RANK_KEYS:  # a point when it moves: the first gather, then some
                assert len(set(points)) == len(points) and expected[0] in {s for s, _, _ in points}, (ref, key)
                continue
            dupes = [p for p, n in Counter(points).items() if n > 1]
            assert not dupes, f"{ref} {key}: {len(dupes)} points stored twice, e.g. {dupes[:3]}"
            got = sorted(step for step, _, _ in points)
            assert got == expected, (f"{ref} {key}: {len(got)} points stored, {len(expected)} produced; "
                                     f"missing {sorted(set(expected) - set(got))[:5]}, "
                                     f"extra {[s for s, n in Counter(got).items() if n > 1 or s not in expected][:5]}")
    return {ref: sum(len(p) for k, p in by_key.items() if k not in keys.SPARSE_RANK_KEYS) for ref, by_key in stored.items()}


def _produced(steps: int) -> dict[str, int]:
    n = len(_gather_steps(steps))
    return {"parent": n * len(PARENT_KEYS), "rank0": n * len(DENSE), "rank1": n * len(DENSE)}


def _summary(job: Job) -> dict:
    summary = json.loads(job.summary.read_text())
    assert summary["steps"] == job.steps, summary  # the job trained what the expected counts assume
    return summary


def _report(**fields) -> None:
    print("outage-test " + json.dumps(fields), file=sys.stderr)


# -- tests ---------------------------------------------------------------------------------------
def test_outage_mid_job_loses_nothing_and_stores_nothing_twice(server, tmp_path, monkeypatch):
    server.up()
    client = _client(server, monkeypatch)
    job = Job(server, tmp_path, STEPS_OUTAGE, "outage-back")
    try:
        _wait_until_training_reaches_the_store(client, job)
        t_down = _now_ms()
        server.down()
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            assert job.running(), f"the job ended during the outage (make STEPS_OUTAGE larger):\n{job.output()[-3000:]}"
            time.sleep(0.5)
        restart_s = server.up()
        t_back = _now_ms()
        assert job.running(), "the job ended before the server was back (make STEPS_OUTAGE larger)"
        rc = job.wait(600)
    finally:
        job.kill()
    out = job.output()
    assert rc == 0, out[-4000:]
    assert "events spooled in" not in out, out[-3000:]  # everything reached the store before the end
    assert not list(tmp_path.glob("hvdkit-spool/*/events.jsonl")), "a fully applied spool is removed"
    assert server.user[1] not in out and server.admin[1] not in out
    summary = _summary(job)
    # training went on through the outage: it ended after the server was back
    assert summary["marks"]["train_end"] * 1000 > t_back

    stored = _stored(client, "outage-back")
    per_run = _check_exact(stored, job.steps)
    assert per_run == _produced(job.steps)
    during = [p for p in stored["parent"][keys.SAMPLES_PER_SEC] if t_down <= p[1] <= t_back]
    # gathers every LOG_EVERY * ~STEP_S s: points of the outage window are there (all of them, by
    # the exact count above), the gathers went on at their pace while nothing could be stored
    assert len(during) >= 0.5 * (t_back - t_down) / 1000 / (LOG_EVERY * STEP_S), len(during)
    _report(test="back", outage_s=round((t_back - t_down) / 1000, 1), restart_s=round(restart_s, 1),
            produced_per_run=_produced(job.steps),
            stored_per_run=per_run, parent_points_during_outage=len(during), duplicates=0,
            train_s=round(summary["seconds"], 1))


def test_server_never_back_job_ends_names_its_spool_and_sync_delivers_it(server, tmp_path, monkeypatch):
    server.up()
    client = _client(server, monkeypatch)
    job = Job(server, tmp_path, STEPS_DEAD, "outage-dead")
    try:
        _wait_until_training_reaches_the_store(client, job)
        server.down()
        rc = job.wait(600)  # the server stays down
    finally:
        job.kill()
    out = job.output()
    assert rc == 0, out[-4000:]
    summary = _summary(job)
    end_s = job.ended - summary["marks"]["train_end"]
    # a dead store costs the end of the job at most the writer's close timeout (plus the exit of
    # two processes under horovodrun), not MLflow's minutes of retries
    assert end_s < CLOSE_TIMEOUT_S + 30, end_s
    m = re.search(r"(\d+) events spooled in (\S+); replay with: hvdkit sync (\S+)", out)
    assert m, out[-3000:]
    pending = int(m.group(1))
    spool = tmp_path / m.group(3)  # relative to rank 0's working directory, the job's
    assert (spool / "events.jsonl").is_file() and pending > 0
    assert server.user[1] not in out and server.admin[1] not in out

    restart_s = server.up()
    first = hvdkit(["sync", str(spool)], cwd=tmp_path, env=_job_env(server))
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    m1 = re.search(r"(\d+) events applied, (\d+) skipped", first.stdout)
    assert m1, first.stdout
    applied, skipped = int(m1.group(1)), int(m1.group(2))
    assert applied == pending, first.stdout  # what the job said it left, no more, no less
    assert applied + skipped == len((spool / "events.jsonl").read_text().splitlines())
    per_run = _check_exact(_stored(client, "outage-dead"), job.steps)

    again = hvdkit(["sync", str(spool)], cwd=tmp_path, env=_job_env(server))
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    m2 = re.search(r"(\d+) events applied, (\d+) skipped", again.stdout)
    assert m2 and int(m2.group(1)) == 0, again.stdout
    assert _check_exact(_stored(client, "outage-dead"), job.steps) == per_run == _produced(job.steps)
    assert server.user[1] not in first.stdout + first.stderr + again.stdout + again.stderr
    _report(test="never-back", job_end_after_train_s=round(end_s, 1), pending=pending, restart_s=round(restart_s, 1),
            sync_applied=applied, sync_skipped=skipped,
            second_sync_applied=int(m2.group(1)), second_sync_skipped=int(m2.group(2)), stored_per_run=per_run)
