"""The spool: a job whose store is unreachable replays completely, and only once."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from hvdkit.errors import TrackingError
from hvdkit.tracking import TrackingConfig, keys, sync_spool
from hvdkit.tracking._apply import _chunks, _Pending
from hvdkit.tracking._spool import Spool
from hvdkit.tracking._sqlfast import SqliteBulkMetrics

try:
    from test_tracking_support import FakeWorld, finish_all, job_runs, sqlite_store, start_all, step_all
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import FakeWorld, finish_all, job_runs, sqlite_store, start_all, step_all

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


def _snapshot(client):
    """Everything a replay could duplicate: runs, and every metric point of every run."""
    out = {}
    for run in job_runs(client):
        name = run.data.tags.get(keys.TAG_RANK, "parent")
        points = {k: len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
        out[name] = (run.info.run_id, run.info.status, points, dict(run.data.params))
    return out


def _offline_job(tmp_path, monkeypatch, steps=12):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(
        tracking_uri=UNREACHABLE,
        log_every=5,
        spool_dir=str(tmp_path / "spool"),
        start_timeout_s=10,
        close_timeout_s=1,
    )
    trackers = FakeWorld(2).trackers(cfg)
    start_all(trackers, params={"lr": 0.1}, tags={keys.TAG_RECIPE: "mnist"})
    for step in range(1, steps + 1):
        step_all(trackers, step)
    (tmp_path / "model.txt").write_text("weights")
    trackers[0].log_artifact(tmp_path / "model.txt", artifact_path="model")
    (tmp_path / "model.txt").write_text("changed after logging")  # the spool holds the logged copy
    finish_all(trackers)
    return trackers


@pytest.mark.job
def test_unreachable_store_spools_and_sync_replays_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trackers = _offline_job(tmp_path, monkeypatch)
    assert trackers[0].run_id is None and trackers[1].run_id is None  # store down at start
    report = trackers[0].close_report
    spool_dir = tmp_path / "spool" / trackers[0].job_id
    assert report.applied == 0 and report.pending == report.spooled > 0
    err = capsys.readouterr().err.strip().splitlines()
    line = f"{report.spooled} events spooled in {spool_dir}; replay with: hvdkit sync {spool_dir}"
    assert [x for x in err if "events spooled" in x] == [line]

    uri = sqlite_store(tmp_path)
    first = sync_spool(spool_dir, uri)
    assert (first.applied, first.skipped) == (report.spooled, 0)
    assert set(first.runs) == {"parent", "rank0", "rank1"}
    client = MlflowClient(uri)
    snap = _snapshot(client)
    assert set(snap) == {"parent", "0", "1"}
    for name in ("0", "1"):
        run_id, status, points, _ = snap[name]
        assert status == "FINISHED"
        assert {k: n for k, n in points.items() if k not in keys.SPARSE_RANK_KEYS} == {k: 3 for k in [k for k in keys.RANK_VECTOR if k not in keys.SPARSE_RANK_KEYS and k != keys.LAYER_COMM_S]}  # steps 5, 10, 12 (finish)
        assert 1 <= points[keys.PEAK_RSS_MB] <= 3  # sparse: a point when it moves
    assert snap["parent"][3] == {"lr": "0.1", "parallel.model": "1", "parallel.data": "2"}
    parent_id = first.runs["parent"]
    assert client.get_run(first.runs["rank1"]).data.tags[keys.MLFLOW_PARENT_RUN_ID] == parent_id
    art = client.download_artifacts(parent_id, "model/model.txt", str(tmp_path / "dl"))
    assert open(art).read() == "weights"

    second = sync_spool(spool_dir, uri)
    assert (second.applied, second.skipped) == (0, report.spooled)
    assert second.runs == first.runs
    assert _snapshot(client) == snap


@pytest.mark.job
def test_replay_after_a_crash_mid_sync_creates_nothing_twice(tmp_path, monkeypatch):
    """The worst case: the state file lost both the cursor and the run ids after the runs were
    created and the metrics written. The replay finds the runs by tag and MLflow dedups the
    re-sent points."""
    monkeypatch.chdir(tmp_path)
    trackers = _offline_job(tmp_path, monkeypatch, steps=7)
    spool_dir = tmp_path / "spool" / trackers[0].job_id
    uri = sqlite_store(tmp_path)
    sync_spool(spool_dir, uri)
    client = MlflowClient(uri)
    snap = _snapshot(client)

    state_path = spool_dir / "state.json"
    state = json.loads(state_path.read_text())
    target = next(k for k in state["targets"] if k.startswith("sqlite"))
    lost = state["targets"][target]
    lost["creating"] = list(lost["runs"])  # "create sent, answer never recorded"
    lost.update(applied=0, offset=0, runs={})
    state_path.write_text(json.dumps(state))

    again = sync_spool(spool_dir, uri)
    assert again.skipped == 0 and again.applied > 0
    assert _snapshot(client) == snap


def test_sync_errors_are_tracking_errors(tmp_path):
    with pytest.raises(TrackingError, match="not an hvdkit spool"):
        sync_spool(tmp_path)
    spool = Spool.create(tmp_path, "job1", "sqlite:///x.db")
    spool.lock()
    try:
        with pytest.raises(TrackingError, match="in use"):
            sync_spool(spool.dir, "sqlite:///x.db")
    finally:
        spool.unlock()


def test_torn_last_line_is_left_for_later(tmp_path):
    spool = Spool.create(tmp_path, "job1", "sqlite:///x.db")
    with spool.open_append() as f:
        f.write(spool.encode({"op": "end_run", "ref": "parent", "status": "FINISHED", "end_time": 1}))
        f.write('{"op": "end_r')
    events, end = spool.read_from(0, 100)
    assert len(events) == 1 and end == len(spool.encode(events[0]))


def test_batches_stay_within_mlflow_limits():
    p = _Pending()
    p.add(
        {
            "metrics": [["m", float(i), 1, i] for i in range(2500)],
            "params": {f"p{i}": "v" * 6000 for i in range(250)},
            "tags": {f"t{i}": "x" for i in range(150)},
        }
    )
    chunks = list(_chunks(p))
    assert sum(len(m) for m, _, _ in chunks) == 2500
    assert sum(len(pp) for _, pp, _ in chunks) == 250 and sum(len(t) for _, _, t in chunks) == 150
    for m, pp, t in chunks:
        assert len(m) <= 1000 and len(pp) <= 100 and len(t) <= 100 and len(m) + len(pp) + len(t) <= 1000
        assert sum(len(x.key) + len(x.value) for x in [*pp, *t]) < 1_000_000


def test_bulk_sqlite_path_stores_what_log_batch_stores(tmp_path):
    uri = sqlite_store(tmp_path)
    client = MlflowClient(uri)
    exp = client.create_experiment("bulk")
    a, b = (client.create_run(exp).info.run_id for _ in range(2))
    points = [
        ("loss", 3.0, 100, 2),
        ("loss", 1.0, 100, 1),
        ("loss", math.nan, 101, 3),
        ("loss", 1.0, 100, 1),  # duplicate, as a replay re-sends it
        ("big", math.inf, 100, 1),
        ("big", -math.inf, 100, 2),
        ("acc", 0.5, 105, 7),
        ("acc", 0.25, 110, 7),
    ]
    bulk = SqliteBulkMetrics.for_client(client)
    assert bulk is not None
    assert bulk.log([(a, k, v, ts, s) for k, v, ts, s in points]) == set()
    bulk.log([(a, k, v, ts, s) for k, v, ts, s in points])  # replayed: nothing new
    client.log_batch(b, [Metric(k, v, ts, s) for k, v, ts, s in points])

    def view(run_id):
        run = client.get_run(run_id)
        hist = {
            k: sorted((m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value) for m in client.get_metric_history(run_id, k))
            for k in ("loss", "big", "acc")
        }
        latest = {k: ("nan" if math.isnan(v) else v) for k, v in run.data.metrics.items()}
        return hist, latest

    assert view(a) == view(b)
    client.delete_run(b)
    assert bulk.log([(b, "loss", 1.0, 1, 1)]) == {b}  # a deleted run is refused, like log_batch
