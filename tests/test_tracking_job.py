"""JobTracker on a real sqlite MLflow store, with two "ranks" in this process."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from hvdkit.errors import TrackingError, UsageError
from hvdkit.tracking import (
    NullJobTracker,
    TrackingConfig,
    World,
    flatten_params,
    keys,
    open_job_tracker,
    rank_zero,
    rank_zero_only,
    run_throughput,
)

try:
    from test_tracking_support import FakeWorld, finish_all, job_runs, patient_config, sqlite_store, start_all, step_all, step_values
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import FakeWorld, finish_all, job_runs, patient_config, sqlite_store, start_all, step_all, step_values

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

LOG_EVERY = 5
STEPS = 22  # gathers at 5, 10, 15, 20 and the partial interval flushed by finish() at 22
GATHER_STEPS = [5, 10, 15, 20, 22]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts of sqlite experiments land under the cwd
    uri = sqlite_store(tmp_path)
    return uri, MlflowClient(tracking_uri=uri)


def _config(uri, tmp_path, **kw):
    # patient_config: start() and close() wait as long as the store takes (CI once read 2 of 3
    # runs after close gave up); the tests check close's report before reading the store.
    kw.setdefault("log_every", LOG_EVERY)
    return patient_config(uri, tmp_path / "spool", **kw)


def _all_applied(tracker) -> None:
    """What the store's contents rest on: close() gave up on nothing (nothing left spooled)."""
    report = tracker.close_report
    assert report is not None and report.pending == 0 and report.dropped == 0, report


def _run_job(trackers, steps=STEPS, status="FINISHED", params=None, tags=None):
    start_all(trackers, params=params, tags=tags or {keys.TAG_RECIPE: "mnist", keys.TAG_FRAMEWORK: "torch"})
    for step in range(1, steps + 1):
        step_all(trackers, step)
    finish_all(trackers, status)


def test_two_ranks_one_parent_two_children_and_exact_sums(store, tmp_path):
    uri, client = store
    world = FakeWorld(2)
    trackers = world.trackers(_config(uri, tmp_path, run_name="job"), hostnames=["node-a", "node-b"])
    start_all(trackers, params={"optim": {"lr": 0.1, "momentum": 0.9}, "layers": [1, 2]}, tags={keys.TAG_RECIPE: "mnist"})
    assert trackers[0].run_id is not None and trackers[0].run_id == trackers[1].run_id
    for r, t in enumerate(trackers):
        t.set_model_size(1000 + r)  # what the framework layer reports: its slice of the model
    for step in range(1, STEPS + 1):
        step_all(trackers, step)
        if step == 10:
            for t in trackers:
                t.log_metrics({keys.VAL_LOSS: 0.5, keys.VAL_ACCURACY: np.float32(0.75)}, step=step)
    finish_all(trackers)
    _all_applied(trackers[0])
    assert not (tmp_path / "spool" / trackers[0].job_id).exists()  # applied: the spool is gone

    runs = job_runs(client)
    parents = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    children = sorted(
        (r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK), key=lambda r: r.data.tags[keys.TAG_RANK]
    )
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_id == trackers[0].run_id
    assert parent.info.run_name == "job"
    assert parent.data.tags[keys.TAG_HOSTS] == "node-a,node-b"
    assert parent.data.tags[keys.TAG_WORLD_SIZE] == "2"
    assert parent.data.params == {"optim.lr": "0.1", "optim.momentum": "0.9", "layers": "[1,2]",
                                  "parallel.model": "1", "parallel.data": "2"}  # the layout, always
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r, child in enumerate(children):
        assert child.info.run_name == f"rank-{r}"
        assert child.data.tags[keys.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.data.tags[keys.TAG_RANK] == str(r)
        assert child.data.tags[keys.TAG_HOST] == ["node-a", "node-b"][r]
        assert child.data.tags[keys.TAG_RECIPE] == "mnist"

    hist = {
        (r, k): {m.step: m.value for m in client.get_metric_history(c.info.run_id, k)}
        for r, c in enumerate(children)
        for k in keys.RANK_VECTOR
    }
    dense = set(keys.RANK_VECTOR) - keys.SPARSE_RANK_KEYS - {keys.LAYER_COMM_S}
    for (r, k), points in hist.items():
        if k in dense:
            assert sorted(points) == GATHER_STEPS, (r, k)
    for r in range(2):
        assert hist[(r, keys.LAYER_COMM_S)] == {}, r  # the model is not split: no column of zeros
        assert hist[(r, keys.PARAMETERS)] == {GATHER_STEPS[0]: 1000 + r}, r  # sparse: one point, it never moved
        peak = hist[(r, keys.PEAK_RSS_MB)]
        assert GATHER_STEPS[0] in peak and set(peak) <= set(GATHER_STEPS), (r, peak)
        assert all(v > 0 for v in peak.values())
    for r in range(2):
        v = step_values(r, 1)
        expect_sps = v["samples"] / (v["step_time_s"] + v["data_time_s"])
        assert all(math.isclose(x, expect_sps) for x in hist[(r, keys.SAMPLES_PER_SEC)].values())
        assert all(x == v["step_time_s"] for x in hist[(r, keys.STEP_TIME_S)].values())
        assert all(x > 0 for x in hist[(r, keys.RSS_MB)].values())

    p_sps = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.SAMPLES_PER_SEC)}
    p_loss = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.LOSS)}
    p_strag = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, keys.STRAGGLER_RATIO)}
    assert sorted(p_sps) == GATHER_STEPS
    for step in GATHER_STEPS:
        # exact: the parent value is the correctly rounded sum of exactly the stored child values
        assert p_sps[step] == math.fsum(hist[(r, keys.SAMPLES_PER_SEC)][step] for r in range(2))
        assert math.isclose(p_loss[step], (hist[(0, keys.LOSS)][step] + hist[(1, keys.LOSS)][step]) / 2)
        st = [hist[(r, keys.STEP_TIME_S)][step] for r in range(2)]
        assert math.isclose(p_strag[step], max(st) / float(np.median(st)))
    assert parent.data.metrics[keys.WORLD_SIZE] == 2
    assert parent.data.metrics[keys.VAL_LOSS] == 0.5 and parent.data.metrics[keys.VAL_ACCURACY] == 0.75
    # throughput for efficiency: mean of the parent history without the warm-up interval
    assert math.isclose(trackers[0].throughput(), sum(p_sps[s] for s in GATHER_STEPS[1:]) / 4)


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_failed_and_killed_end_every_run(store, tmp_path, status):
    uri, client = store
    trackers = FakeWorld(2).trackers(_config(uri, tmp_path))
    if status == "FAILED":
        _run_job(trackers, steps=7, status="FAILED")
    else:
        start_all(trackers)
        with pytest.raises(KeyboardInterrupt):
            with trackers[1], trackers[0]:  # rank 0's context exits first, like the others
                step_all(trackers, 1)
                raise KeyboardInterrupt
    _all_applied(trackers[0])
    runs = job_runs(client)
    assert len(runs) == 3
    assert {r.info.status for r in runs} == {status}
    assert all(r.info.end_time for r in runs)
    trackers[0].finish("FINISHED")  # idempotent: the status stays
    assert {r.info.status for r in job_runs(client)} == {status}


def test_invalid_metric_name_raises_tracking_error(store, tmp_path):
    uri, _ = store
    trackers = FakeWorld(2).trackers(_config(uri, tmp_path))
    start_all(trackers)
    for bad in ("val/../loss", "loss?", "/abs", "x" * 300):
        for t in trackers:  # the same error on every rank
            with pytest.raises(TrackingError, match="metric name") as exc:
                t.log_metrics({bad: 1.0}, step=1)
            assert bad[:40] in str(exc.value)
    with pytest.raises(TrackingError, match="non-numeric"):
        trackers[0].log_metrics({"val_loss": "high"}, step=1)
    with pytest.raises(UsageError, match="status"):
        trackers[0].finish("DONE")
    finish_all(trackers)


def test_nan_and_inf_are_kept_and_reported_once(store, tmp_path, caplog):
    uri, client = store
    trackers = FakeWorld(2).trackers(_config(uri, tmp_path))

    def values(rank, step):
        v = step_values(rank, step)
        if rank == 1:
            v["loss"] = math.nan
        return v

    start_all(trackers)
    with caplog.at_level(logging.WARNING, logger="hvdkit.tracking"):
        for step in range(1, 11):
            step_all(trackers, step, values)
        trackers[0].log_metrics({keys.VAL_LOSS: math.inf}, step=10)
        finish_all(trackers)
    warned = [r for r in caplog.records if "loss=nan" in r.getMessage()]
    assert len(warned) == 1
    runs = {r.data.tags.get(keys.TAG_RANK, "parent"): r for r in job_runs(client)}
    assert math.isnan(client.get_metric_history(runs["1"].info.run_id, keys.LOSS)[0].value)
    assert not math.isnan(client.get_metric_history(runs["0"].info.run_id, keys.LOSS)[0].value)
    parent_loss = client.get_metric_history(runs["parent"].info.run_id, keys.LOSS)
    assert len(parent_loss) == 2 and all(math.isnan(m.value) for m in parent_loss)
    assert runs["parent"].data.metrics[keys.VAL_LOSS] > 1e300  # MLflow clamps inf to max double
    assert {r.info.status for r in runs.values()} == {"FINISHED"}


def test_rank_sampling_keeps_all_ranks_in_parent_keys(store, tmp_path):
    uri, client = store
    world = FakeWorld(4)
    trackers = world.trackers(_config(uri, tmp_path, per_rank_runs=2))
    _run_job(trackers, steps=LOG_EVERY)
    runs = job_runs(client)
    ranks = sorted(r.data.tags[keys.TAG_RANK] for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK)
    assert ranks == ["0", "2"]
    parent = next(r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT)
    assert parent.data.tags[keys.TAG_RANK_SAMPLING] == "2"
    expect = math.fsum(step_values(r, 1)["samples"] / (step_values(r, 1)["step_time_s"] + 0.0078125) for r in range(4))
    assert math.isclose(parent.data.metrics[keys.SAMPLES_PER_SEC], expect)


def test_no_child_runs(store, tmp_path):
    uri, client = store
    _run_job(FakeWorld(2).trackers(_config(uri, tmp_path, per_rank_runs=False)), steps=LOG_EVERY)
    runs = job_runs(client)
    assert len(runs) == 1 and runs[0].data.tags[keys.TAG_ROLE] == keys.ROLE_PARENT
    assert runs[0].info.run_name == "mnist-np2"  # default name: recipe and world size


def test_disabled_tracking_calls_no_collective(tmp_path):
    def never(*_):
        raise AssertionError("collective called with tracking disabled")

    t = open_job_tracker(TrackingConfig(enabled=False), World(0, 2), never, never)
    assert isinstance(t, NullJobTracker)
    t.start({"a": 1}, {})
    for step in range(1, 30):
        t.record_step(step, samples=1, step_time_s=0.1, data_time_s=0.0, comm_wait_s=0.0, loss=1.0)
    t.log_metrics({"val_loss": 1.0}, step=1)
    t.log_artifact(tmp_path)
    t.finish()
    assert t.run_id is None


def test_bad_config_is_a_usage_error():
    w = World(0, 1)
    with pytest.raises(UsageError, match="log_every"):
        open_job_tracker(TrackingConfig(log_every=0), w, None, None)
    with pytest.raises(UsageError, match="per_rank_runs"):
        open_job_tracker(TrackingConfig(per_rank_runs=0), w, None, None)
    with pytest.raises(UsageError, match="hostnames"):
        open_job_tracker(TrackingConfig(), World(0, 2, hostnames=["a"]), None, None)


def test_record_step_is_cheap_between_gathers(store, tmp_path):
    uri, _ = store
    world = FakeWorld(1)
    (t,) = world.trackers(_config(uri, tmp_path, log_every=1_000_000))
    t.start({}, {})
    before = t._writer._queue.qsize()
    t0 = time.perf_counter()
    for step in range(1, 20_001):
        t.record_step(step, samples=32, step_time_s=0.1, data_time_s=0.01, comm_wait_s=0.02, loss=0.5)
    per_step = (time.perf_counter() - t0) / 20_000
    assert world.gathers == 0 and t._writer._queue.qsize() == before  # no store work at all
    assert per_step < 20e-6, f"record_step took {per_step * 1e6:.1f} us"
    t.finish()


def test_flatten_params():
    flat = flatten_params({"a": {"b": {"c": 1}}, "l": [1, "x"], "n": None, "long": "y" * 7000, "e": {}})
    assert flat["a.b.c"] == "1" and flat["l"] == '[1,"x"]' and flat["n"] == "None" and flat["e"] == "{}"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")
    with pytest.raises(TrackingError, match="param name"):
        flatten_params({"bad?key": 1})


def test_import_pulls_in_no_framework():
    code = (
        "import sys, hvdkit.tracking;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'horovod'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scaling_efficiency_against_the_np1_baseline(store, tmp_path, capsys):
    uri, client = store
    tags = {keys.TAG_RECIPE: "mnist", keys.TAG_FRAMEWORK: "torch", keys.TAG_BATCH_SIZE: "32"}
    two = FakeWorld(2).trackers(_config(uri, tmp_path))
    _run_job(two, steps=15, tags=tags)  # no np=1 run yet
    assert "no np=1 baseline: scaling_efficiency not logged" in capsys.readouterr().err
    assert keys.SCALING_EFFICIENCY not in client.get_run(two[0].run_id).data.metrics

    one = FakeWorld(1).trackers(_config(uri, tmp_path))
    _run_job(one, steps=15, tags=tags)
    assert keys.SCALING_EFFICIENCY not in client.get_run(one[0].run_id).data.metrics  # np=1: nothing to compare

    two = FakeWorld(2).trackers(_config(uri, tmp_path))
    _run_job(two, steps=15, tags=tags)
    parent = client.get_run(two[0].run_id)
    t1 = run_throughput(client, one[0].run_id)
    t2 = run_throughput(client, two[0].run_id)
    assert math.isclose(parent.data.metrics[keys.SCALING_EFFICIENCY], t2 / (2 * t1))
    assert parent.data.tags[keys.TAG_BASELINE_RUN_ID] == one[0].run_id

    bad = FakeWorld(2).trackers(_config(uri, tmp_path, baseline_run_id="0" * 32))
    for t in bad:  # every rank fails the same way, none waits on a collective
        with pytest.raises(TrackingError, match="unknown --baseline run ID"):
            t.start({}, tags)
    assert len(job_runs(client)) == 3 + 2 + 3  # the failed launch created no run


def test_world_from_horovod_env(monkeypatch):
    for var in ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "1")
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    monkeypatch.setenv("HOROVOD_LOCAL_RANK", "1")
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "2")
    monkeypatch.setenv("HOROVOD_HOSTNAME", "node-b")
    other = np.zeros(64, dtype=np.uint8)
    other[:6] = np.frombuffer(b"node-a", dtype=np.uint8)
    w = World.from_horovod_env(1, 2, lambda buf: np.stack([other, buf]))  # an allgather
    assert (w.local_rank, w.local_size, w.hostnames) == (1, 2, ["node-a", "node-b"])
    w = World.from_horovod_env(1, 2, lambda obj: other)  # a broadcast: only rank 0's name
    assert w.hostnames == []


def test_rank_zero_helpers():
    assert rank_zero(0, lambda a, b=0: a + b, 1, b=2, default="no") == 3
    assert rank_zero(1, lambda: 1 / 0, default="no") == "no"
    assert rank_zero_only(0)(lambda: 5)() == 5
    assert rank_zero_only(3)(lambda: 5)() is None


def test_accelerator_is_part_of_the_host_type_and_of_the_baseline_match(store, tmp_path, capsys):
    from hvdkit.tracking.efficiency import find_baseline, host_type

    uri, client = store
    gpu = "NVIDIA H100 80GB HBM3"
    tags = {keys.TAG_RECIPE: "mnist", keys.TAG_FRAMEWORK: "torch", keys.TAG_BATCH_SIZE: "32"}
    cpu_one = FakeWorld(1).trackers(_config(uri, tmp_path))
    _run_job(cpu_one, steps=15, tags=tags)  # an np=1 CPU run: no baseline for a GPU job
    gpu_two = FakeWorld(2).trackers(_config(uri, tmp_path, accelerator=gpu))
    _run_job(gpu_two, steps=15, tags=tags)

    cpu_type = client.get_run(cpu_one[0].run_id).data.tags[keys.TAG_HOST_TYPE]
    gpu_parent = client.get_run(gpu_two[0].run_id)
    gpu_type = gpu_parent.data.tags[keys.TAG_HOST_TYPE]
    assert cpu_type == host_type() and gpu_type == host_type(gpu) and gpu_type.endswith("-nvidia-h100-80gb-hbm3")
    assert cpu_type != gpu_type
    children = [r for r in job_runs(client) if r.data.tags.get(keys.MLFLOW_PARENT_RUN_ID) == gpu_two[0].run_id]
    assert len(children) == 2 and {r.data.tags[keys.TAG_HOST_TYPE] for r in children} == {gpu_type}
    assert keys.SCALING_EFFICIENCY not in gpu_parent.data.metrics
    assert "no np=1 baseline: scaling_efficiency not logged" in capsys.readouterr().err
    exp_id = client.get_experiment_by_name("hvdkit").experiment_id
    assert find_baseline(client, exp_id, "mnist", "torch", "32", gpu_type) is None
    assert find_baseline(client, exp_id, "mnist", "torch", "32", cpu_type).run_id == cpu_one[0].run_id

    gpu_one = FakeWorld(1).trackers(_config(uri, tmp_path, accelerator=gpu))
    _run_job(gpu_one, steps=15, tags=tags)
    gpu_two = FakeWorld(2).trackers(_config(uri, tmp_path, accelerator=gpu))
    _run_job(gpu_two, steps=15, tags=tags)
    # Each job divides by the np=1 run of its own host type, whichever finished last.
    assert client.get_run(gpu_two[0].run_id).data.tags[keys.TAG_BASELINE_RUN_ID] == gpu_one[0].run_id
    cpu_two = FakeWorld(2).trackers(_config(uri, tmp_path))
    _run_job(cpu_two, steps=15, tags=tags)
    assert client.get_run(cpu_two[0].run_id).data.tags[keys.TAG_BASELINE_RUN_ID] == cpu_one[0].run_id
