"""Tracking end to end: real horovodrun jobs writing to real sqlite stores in tmp dirs.

Covers the run layout per framework (one parent, one child per rank, every per-rank key at every
gather, parent = sum of children), the context provider on a plain script, an unreachable store
(spool, then ``hvdkit sync``), bad ``--baseline``, ``--no-track``, the run status of failed and
interrupted jobs, and ``hvdkit ui``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import BIN, REPO, horovodrun, hvdkit, worker_env
from hvdkit.tracking import keys

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

DIGITS = str(REPO / "recipes" / "digits.yaml")
QUICK = ["epochs=2", "log.progress=false", "checkpoint.dir=null"]
LOG_EVERY = 10
NOISE = ("oneDNN", "absl::", "cpu_feature_guard", "To enable the following")


def _tail(res: subprocess.CompletedProcess, n: int = 3000) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not any(s in ln for s in NOISE)]
    return "\n".join(lines)[-n:]


def _by_role(runs):
    parents = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    children = sorted((r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK),
                      key=lambda r: int(r.data.tags[keys.TAG_RANK]))
    return parents, children


def _history(client, run_id, key) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _gather_steps(steps: int, log_every: int) -> list[int]:
    """The steps at which the tracker gathers: every log_every, plus the partial last interval."""
    out = list(range(log_every, steps + 1, log_every))
    if steps % log_every:
        out.append(steps)
    return out


def _summary_steps(stdout: str) -> int:
    return int(re.search(r"steps\s*│\s*(\d+)", stdout).group(1))


# -- the layout of a job, per framework --------------------------------------------------------
def _imported_by_rank(log_dir: Path) -> dict[int, set[str]]:
    """The top-level modules each rank imported, from its ``-X importtime`` lines in the raw log
    (``[<rank>]<stderr>:import time: self | cumulative | module``; rank 0's apply child writes to
    rank 0's stderr)."""
    line_re = re.compile(r"^\[(\d+)\]<stderr>:import time:\s+\d+ \|\s+\d+ \| +([\w.]+)")
    by_rank: dict[int, set[str]] = {}
    for log in log_dir.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            m = line_re.match(line)
            if m:
                by_rank.setdefault(int(m.group(1)), set()).add(m.group(2).split(".")[0])
    return by_rank


@pytest.mark.horovod
@pytest.mark.parametrize("framework", [pytest.param("torch", marks=pytest.mark.quick), "tensorflow"])  # quick: make test-quick's job
def test_two_rank_job_one_parent_two_children_every_key(tmp_path, framework):
    uri = sqlite_store(tmp_path)
    res = hvdkit(["run", DIGITS, "-np", "2", "--framework", framework, "--log-every", str(LOG_EVERY), *QUICK],
                 cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri, PYTHONPROFILEIMPORTTIME="1",
                                              HVDKIT_LOG_DIR=str(tmp_path / "logs")))
    assert res.returncode == 0, _tail(res)
    # A rank that does not write stays lean to its end: no MLflow, and a torch rank neither TensorFlow
    # nor scikit-learn (Keras imports that itself); the framework shows that the lines were read.
    imported = _imported_by_rank(tmp_path / "logs")
    assert framework in imported.get(1, set()), sorted(imported)
    lean = {"mlflow"} | ({"tensorflow", "keras", "sklearn"} if framework == "torch" else set())
    assert not imported[1] & lean, sorted(imported[1] & lean)
    assert "mlflow" in imported[0]  # the writer's rank: its apply child, its datasets
    steps = _summary_steps(res.stdout)
    expect_steps = _gather_steps(steps, LOG_EVERY)

    client = MlflowClient(tracking_uri=uri)
    runs = job_runs(client)
    parents, children = _by_role(runs)
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2, [r.info.run_name for r in runs]
    parent = parents[0]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert parent.data.tags[keys.TAG_FRAMEWORK] == framework
    assert parent.data.tags[keys.TAG_WORLD_SIZE] == "2"
    for r, child in enumerate(children):
        assert child.info.run_name == f"rank-{r}"
        assert child.data.tags[keys.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.data.tags[keys.TAG_JOB_ID] == parent.data.tags[keys.TAG_JOB_ID]
        assert _history(client, child.info.run_id, keys.PEAK_RSS_MB)  # sparse: a point when it moves
        assert len(_history(client, child.info.run_id, keys.PARAMETERS)) == 1  # once: it never moves
        for key in [k for k in keys.RANK_VECTOR if k not in keys.SPARSE_RANK_KEYS and k != keys.LAYER_COMM_S]:  # every other per-rank key, at every gather (layer_comm_s: split models only)
            hist = _history(client, child.info.run_id, key)
            assert sorted(hist) == expect_steps, (framework, r, key, sorted(hist))
            assert all(math.isfinite(v) for v in hist.values()), (r, key, hist)
        assert all(v > 0 for v in _history(client, child.info.run_id, keys.STEP_TIME_S).values())

    # the parent's samples_per_sec is the sum of the children's at each logged step
    p_sps = _history(client, parent.info.run_id, keys.SAMPLES_PER_SEC)
    c_sps = [_history(client, c.info.run_id, keys.SAMPLES_PER_SEC) for c in children]
    assert sorted(p_sps) == expect_steps
    for step in expect_steps:
        assert math.isclose(p_sps[step], sum(h[step] for h in c_sps), rel_tol=1e-12), step
    assert parent.data.metrics[keys.WORLD_SIZE] == 2
    assert 0 <= parent.data.metrics[keys.VAL_ACCURACY] <= 1
    assert not list(tmp_path.glob("hvdkit-spool/*")), "a fully applied spool is removed"


# -- the context provider on a plain mlflow script --------------------------------------------
PLAIN_SCRIPT = """
import os
import mlflow
from filelock import FileLock

rank = int(os.environ["HOROVOD_RANK"])
with FileLock(os.environ["STORE_LOCK"]):  # one sqlite writer at a time
    mlflow.set_experiment("plain")
    with mlflow.start_run(run_name=f"plain-{rank}"):
        mlflow.log_metric("x", float(rank))
"""


@pytest.mark.horovod
def test_context_tags_on_a_plain_mlflow_script_under_horovodrun(tmp_path):
    uri = sqlite_store(tmp_path)
    MlflowClient(tracking_uri=uri).create_experiment("plain")  # created once, not raced by the ranks
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent(PLAIN_SCRIPT))
    res = horovodrun([sys.executable, str(script)], np=2, cwd=tmp_path,
                     env=worker_env(MLFLOW_TRACKING_URI=uri, STORE_LOCK=str(tmp_path / "store.lock")))
    assert res.returncode == 0, _tail(res)
    runs = job_runs(MlflowClient(tracking_uri=uri), "plain")
    assert sorted(r.info.run_name for r in runs) == ["plain-0", "plain-1"]
    for run in runs:
        tags = run.data.tags
        rank = run.info.run_name.split("-")[1]
        assert tags["horovod.rank"] == rank
        assert tags["horovod.size"] == "2"
        assert tags["horovod.local_size"] == "2"
        assert tags["horovod.controller"] == "gloo"
        assert tags["horovod.hostname"]
        assert tags["horovod.version"] == "0.28.1"


# -- an unreachable store: training finishes, the spool replays --------------------------------
@pytest.mark.horovod
def test_unreachable_store_spools_and_sync_replays_it(tmp_path):
    env = worker_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                     MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    t0 = time.monotonic()
    res = hvdkit(["run", DIGITS, "-np", "2", "--framework", "torch", "--log-every", "5", "epochs=1",
                  "log.progress=false", "checkpoint.dir=null"], cwd=tmp_path, env=env)
    took = time.monotonic() - t0
    assert res.returncode == 0, _tail(res)
    assert "samples/s, end to end" in res.stdout  # training finished
    spools = list((tmp_path / "hvdkit-spool").iterdir())
    assert len(spools) == 1, spools
    spool = spools[0]
    assert f"hvdkit sync {Path('hvdkit-spool') / spool.name}" in res.stderr
    events = (spool / "events.jsonl").read_text().splitlines()
    assert events and json.loads((spool / "meta.json").read_text())["tracking_uri"] == "http://127.0.0.1:9"
    assert took < 120, took  # the dead store costs at most the close timeout, not MLflow's retries

    (tmp_path / "store").mkdir()
    target = sqlite_store(tmp_path / "store")
    sync = hvdkit(["sync", str(spool), "--tracking-uri", target], cwd=tmp_path)
    assert sync.returncode == 0, _tail(sync)
    assert f"{len(events)} events applied, 0 skipped" in sync.stdout, sync.stdout
    client = MlflowClient(tracking_uri=target)
    runs = job_runs(client)
    parents, children = _by_role(runs)
    assert len(parents) == 1 and len(children) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    steps = _summary_steps(res.stdout)
    for child in children:
        for key in [k for k in keys.RANK_VECTOR if k not in keys.SPARSE_RANK_KEYS and k != keys.LAYER_COMM_S]:
            assert sorted(_history(client, child.info.run_id, key)) == _gather_steps(steps, 5), key
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id)] == ["recipe"]
    again = hvdkit(["sync", str(spool), "--tracking-uri", target], cwd=tmp_path)
    assert again.returncode == 0 and f"0 events applied, {len(events)} skipped" in again.stdout, again.stdout
    assert len(job_runs(client)) == 3  # nothing created twice


# -- bad input and --no-track --------------------------------------------------------------------
def test_unknown_baseline_exits_2_and_leaves_no_run(tmp_path):
    uri = sqlite_store(tmp_path)
    res = hvdkit(["run", DIGITS, "-np", "2", "--baseline", "0123456789abcdef0123456789abcdef", *QUICK],
                 cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri))
    assert res.returncode == 2, _tail(res)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown --baseline run ID '0123456789abcdef0123456789abcdef'" in err[0], res.stderr
    assert "fix:" in err[0]
    assert job_runs(MlflowClient(tracking_uri=uri)) == []


@pytest.mark.horovod
def test_unknown_baseline_under_plain_horovodrun_is_one_line_per_rank(tmp_path):
    uri = sqlite_store(tmp_path)
    res = horovodrun([sys.executable, "-m", "hvdkit.train", DIGITS, "--baseline", "0123456789abcdef0123456789abcdef",
                      *QUICK], np=2, cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri))
    assert res.returncode != 0
    assert "hvdkit.train: error: unknown --baseline run ID" in res.stdout + res.stderr, _tail(res)
    assert "Traceback" not in "\n".join(ln for ln in res.stderr.splitlines() if ln.startswith("[")), _tail(res)
    runs = job_runs(MlflowClient(tracking_uri=uri))
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.horovod
def test_no_track_writes_nothing(tmp_path):
    db = tmp_path / "never.db"
    res = hvdkit(["run", DIGITS, "-np", "2", "--no-track", *QUICK], cwd=tmp_path,
                 env=worker_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}"))
    assert res.returncode == 0, _tail(res)
    assert not db.exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "hvdkit-spool").exists()
    assert not (tmp_path / "mlflow.db").exists()


# -- run status: FAILED when a rank raises, KILLED when interrupted ----------------------------
FAILING_RECIPE = '''
"""A recipe whose model raises on rank FAIL_RANK after FAIL_AFTER forward passes."""
import os
import time

from hvdkit.recipe import PythonRecipe


class Failing(PythonRecipe):
    config = {"name": "failing", "model": {"name": "custom"}, "data": {"name": "digits"}, "batch_size": 32,
              "steps": 400, "log": {"every_steps": 5, "progress": False}, "eval": {"enabled": False}}

    def build_model(self, framework, input_shape, num_classes):
        import torch

        fail_rank, fail_after = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_AFTER"])
        me = int(os.environ.get("HOROVOD_RANK", "0"))
        busy = float(os.environ.get("BUSY_S", "0"))
        width = 1
        for d in input_shape:
            width *= d

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(width, num_classes)
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                if self.calls > fail_after:
                    if me == fail_rank:
                        raise RuntimeError(f"injected failure on rank {me}")
                    time.sleep(busy)  # busy outside any collective when horovodrun's SIGTERM comes
                return self.lin(x.flatten(1))

        return Model()
'''


@pytest.fixture
def failing_recipe(tmp_path) -> Path:
    path = tmp_path / "failing.py"
    path.write_text(FAILING_RECIPE)
    return path


@pytest.mark.horovod
@pytest.mark.parametrize("busy_s", ["0", "60"], ids=["rank0-in-collective", "rank0-busy-then-sigterm"])
def test_a_rank_raising_ends_every_run_failed(tmp_path, failing_recipe, busy_s):
    """rank0-in-collective: rank 0 gets Horovod's shutdown error and records FAILED itself.
    rank0-busy-then-sigterm: horovodrun SIGTERMs rank 0 while it computes, rank 0 records KILLED,
    and ``hvdkit run`` (which saw horovodrun fail without being interrupted) settles FAILED."""
    uri = sqlite_store(tmp_path)
    res = hvdkit(["run", str(failing_recipe), "-np", "2"], cwd=tmp_path,
                 env=worker_env(MLFLOW_TRACKING_URI=uri, FAIL_RANK="1", FAIL_AFTER="12", BUSY_S=busy_s))
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr, _tail(res)
    runs = job_runs(MlflowClient(tracking_uri=uri))
    parents, children = _by_role(runs)
    assert len(parents) == 1 and len(children) == 2
    assert {r.info.status for r in runs} == {"FAILED"}, [(r.info.run_name, r.info.status) for r in runs]
    if busy_s != "0":
        assert "run(s) marked FAILED" in res.stderr, _tail(res)  # the launcher corrected KILLED


def _wait_for_metrics(client: MlflowClient, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("hvdkit")
        if exp is not None:
            parents = [r for r in client.search_runs([exp.experiment_id])
                       if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT and keys.SAMPLES_PER_SEC in r.data.metrics]
            if parents:
                return parents[0]
        time.sleep(0.5)
    raise AssertionError("the job logged no samples_per_sec in time")


@pytest.mark.horovod
def test_sigint_to_hvdkit_run_ends_every_run_killed(tmp_path):
    uri = sqlite_store(tmp_path)
    proc = subprocess.Popen([str(BIN / "hvdkit"), "run", DIGITS, "-np", "2", "epochs=1000", "log.progress=false",
                             "checkpoint.dir=null"], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        client = MlflowClient(tracking_uri=uri)
        parent = _wait_for_metrics(client)
        assert parent.info.status == "RUNNING"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: hvdkit run's process group
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    assert rc == 130, out[-20:]
    runs = job_runs(client)
    assert len(runs) == 3
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs] + out[-20:]
    # The workers ended their runs themselves (hvdkit run SIGTERMs them before horovodrun, which
    # would SIGSTOP/SIGKILL them): the launcher had nothing left to settle.
    assert not [line for line in out if "marked KILLED" in line], out[-20:]


def test_settle_job_status_moves_only_unfinished_runs(tmp_path):
    from hvdkit.launch.job import settle_job_status

    uri = sqlite_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("hvdkit")
    made = {}
    for name, status in (("running", "RUNNING"), ("killed", "KILLED"), ("failed", "FAILED"), ("done", "FINISHED")):
        run = client.create_run(exp, run_name=name, tags={keys.TAG_JOB_ID: "job-1"})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        made[name] = run.info.run_id
    other = client.create_run(exp, run_name="other-job", tags={keys.TAG_JOB_ID: "job-2"}).info.run_id

    changed = settle_job_status("job-1", "FAILED", experiment="hvdkit", tracking_uri=uri)
    assert sorted(changed) == sorted([made["running"], made["killed"]])
    status = {n: client.get_run(i).info.status for n, i in made.items()}
    assert status == {"running": "FAILED", "killed": "FAILED", "failed": "FAILED", "done": "FINISHED"}
    assert client.get_run(other).info.status == "RUNNING"
    # KILLED never overrides what a rank recorded, it only ends what nobody ended
    run = client.create_run(exp, run_name="k", tags={keys.TAG_JOB_ID: "job-3"}).info.run_id
    assert settle_job_status("job-3", "KILLED", experiment="hvdkit", tracking_uri=uri) == (run,)
    assert client.get_run(run).info.status == "KILLED"
    assert settle_job_status("no-such-job", "FAILED", experiment="nope", tracking_uri=uri) == ()


# -- hvdkit ui ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_and_prints_the_runs_page(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("other")  # so the right id is not simply the first one
    exp_id = client.create_experiment("hvdkit")
    run_id = client.create_run(exp_id, run_name="one-run").info.run_id
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "hvdkit"), "ui", "--port", str(port), "--tracking-uri", uri, "--no-browser"],
                            cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    seen = []
    try:
        url = None
        deadline = time.monotonic() + 240  # mlflow's server start takes a minute on a loaded 2-core machine
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "hvdkit ui exited: " + "".join(seen)
                continue
            seen.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/(\w+)/runs)", line)
            if m:
                url = m.group(1)
        assert url, "no runs-page URL printed: " + "".join(seen[-20:])
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs"
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:  # poll until the UI answers 200
            try:
                with urllib.request.urlopen(base + "/", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the UI never answered 200"
            time.sleep(0.5)
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            found = json.load(resp)["runs"]
        assert [r["info"]["run_id"] for r in found] == [run_id]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # the server went with it
    for _ in range(40):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            time.sleep(0.5)
        except OSError:
            break
    else:
        raise AssertionError(f"mlflow server still listening on {port} after hvdkit ui ended")


def test_ui_port_in_use_is_one_line_exit_2(tmp_path):
    uri = sqlite_store(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = hvdkit(["ui", "--port", str(port), "--tracking-uri", uri, "--no-browser"], cwd=tmp_path, timeout=60)
    assert res.returncode == 2, _tail(res)
    assert f"port {port} on 127.0.0.1 is in use" in res.stderr and "fix:" in res.stderr


def test_sync_of_a_non_spool_is_exit_2(tmp_path):
    res = hvdkit(["sync", str(tmp_path)], cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert "is not an hvdkit spool" in res.stderr and "fix:" in res.stderr


def test_launcher_job_id_reaches_the_runs(tmp_path, monkeypatch):
    """$HVDKIT_JOB_ID (set by hvdkit run / scale) is the job id rank 0 tags the runs with."""
    try:
        from test_tracking_support import FakeWorld, finish_all, patient_config, start_all, step_all
    except ImportError:
        from tests.test_tracking_support import FakeWorld, finish_all, patient_config, start_all, step_all

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(keys.ENV_JOB_ID, "20990101-000000-launcher")
    uri = sqlite_store(tmp_path)
    trackers = FakeWorld(2).trackers(patient_config(uri, tmp_path / "spool", log_every=5))
    start_all(trackers, tags={keys.TAG_RECIPE: "x"})
    assert [t.job_id for t in trackers] == ["20990101-000000-launcher"] * 2  # rank 1 learns it by the broadcast
    for step in range(1, 6):
        step_all(trackers, step)
    finish_all(trackers)
    runs = job_runs(MlflowClient(tracking_uri=uri))
    assert len(runs) == 3 and {r.data.tags[keys.TAG_JOB_ID] for r in runs} == {"20990101-000000-launcher"}


@pytest.mark.horovod
def test_recipe_per_rank_runs_samples_child_runs(tmp_path):
    """log.per_rank_runs: k keeps a child run for every k-th rank only (what a server needs at
    hundreds of ranks); the parent's totals still cover every rank."""
    uri = sqlite_store(tmp_path)
    res = hvdkit(["run", DIGITS, "-np", "2", "steps=20", "log.progress=false", "checkpoint.dir=null", "eval.enabled=false",
                  "log.per_rank_runs=2"], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    runs = job_runs(MlflowClient(tracking_uri=uri))
    parents = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    children = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK]
    assert len(parents) == 1 and [c.data.tags[keys.TAG_RANK] for c in children] == ["0"]
    assert parents[0].data.tags[keys.TAG_RANK_SAMPLING] == "2"
    assert parents[0].data.tags[keys.TAG_WORLD_SIZE] == "2"
    assert parents[0].data.metrics[keys.SAMPLES_PER_SEC] > children[0].data.metrics[keys.SAMPLES_PER_SEC]  # both ranks
