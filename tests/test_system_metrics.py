"""System metrics per host (issue 15 item 1): the sampler on real psutil, and real np=2 jobs read
back from a real MLflow store — one sampler per host, its metrics on that rank's child run only."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import REPO, hvdkit, wait_until, worker_env
from hvdkit.tracking import _system, keys
from hvdkit.tracking._events import ChildRows

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

DIGITS = str(REPO / "recipes" / "digits.yaml")
# 200 steps of digits train for ~4 s at np=2 on 2 cores: several 0.5 s samples, 40 gathers.
QUICK = ["steps=200", "log.every_steps=5", "log.progress=false", "checkpoint.dir=null"]
HOST_KEYS = [k for k in keys.SYSTEM_VECTOR if not k.startswith(keys.SYSTEM_PREFIX + "gpu_")]
GPU_KEYS = [k for k in keys.SYSTEM_VECTOR if k.startswith(keys.SYSTEM_PREFIX + "gpu_")]


def _idx(name: str) -> int:
    return keys.SYSTEM_VECTOR.index(keys.SYSTEM_PREFIX + name)


def test_names_are_mlflows_own_system_metrics():
    """The UI's "System metrics" section draws MLflow's own names: read them from MLflow's monitors."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    theirs = set()
    for monitor in (CPUMonitor(), DiskMonitor(), NetworkMonitor()):
        monitor.collect_metrics()
        theirs |= set(monitor.metrics)
    assert {keys.SYSTEM_PREFIX + k for k in theirs} == set(HOST_KEYS)
    assert keys.RANK_VECTOR[-len(keys.SYSTEM_VECTOR):] == keys.SYSTEM_VECTOR  # appended to the gather vector
    assert keys.RANK_VECTOR[:2] == (keys.SAMPLES_PER_SEC, keys.STEP_TIME_S)  # nothing reordered


def test_fresh_reading_at_the_jobs_end_does_not_wait_for_the_interval():
    # a job shorter than the interval still gets its host's reading at its last gather
    sampler = _system.HostSampler(600.0)
    try:
        assert sampler.latest() is None and sampler.samples == 0
        t0 = time.monotonic()
        s = sampler.fresh(5.0)
        assert time.monotonic() - t0 < 5.0 and sampler.samples == 1
        assert s is not None and 0.0 <= s[_idx("cpu_utilization_percentage")] <= 100.0
        assert sampler.latest() is None  # handed out once
    finally:
        sampler.close()
    assert not sampler.alive and sampler.fresh(0.1) is None


def test_host_sampler_with_real_psutil():
    sampler = _system.HostSampler(0.2)
    try:
        wait_until(lambda: sampler.samples >= 2, 30, "two samples at 0.2 s")
        assert sampler.alive
        s = sampler.latest()
        assert s is not None and s.shape == (len(keys.SYSTEM_VECTOR),)
        assert sampler.latest() is None  # handed out once: the next gather gets NaN, not a repeat
        assert 0.0 <= s[_idx("cpu_utilization_percentage")] <= 100.0
        assert 0.0 < s[_idx("system_memory_usage_percentage")] <= 100.0
        assert s[_idx("system_memory_usage_megabytes")] > 10.0
        assert s[_idx("network_receive_megabytes")] >= 0.0 and s[_idx("network_transmit_megabytes")] >= 0.0
        assert 0.0 < s[_idx("disk_usage_percentage")] <= 100.0
        assert s[_idx("disk_usage_megabytes")] > 0.0 and s[_idx("disk_available_megabytes")] > 0.0
        assert all(math.isfinite(s[keys.SYSTEM_VECTOR.index(k)]) for k in HOST_KEYS)
        gpu = s[len(HOST_KEYS):]
        if sampler.gpus == 0:
            assert np.isnan(gpu).all()  # no GPU (or no NVML): nothing made up
        else:
            assert np.isfinite(gpu[: 3 * sampler.gpus]).all()
    finally:
        sampler.close()
    assert not sampler.alive  # close() joined the thread: no sample can follow
    assert not sampler._thread.is_alive()
    sampler.close()  # idempotent


def test_gpu_without_nvidia_ml_py_warns_once_with_the_fix(monkeypatch, caplog):
    def no_pynvml():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(_system, "_import_pynvml", no_pynvml)
    monkeypatch.setattr(_system, "_warned_no_nvml", False)
    monkeypatch.setattr(_system, "gpu_present", lambda: False)
    with caplog.at_level(logging.WARNING, logger="hvdkit.tracking"):
        _system.HostSampler(5.0).close()
    assert not caplog.records  # no GPU: nothing to say
    monkeypatch.setattr(_system, "gpu_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="hvdkit.tracking"):
        for _ in range(3):
            s = _system.HostSampler(5.0)
            assert s.gpus == 0
            s.close()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert "nvidia-ml-py is not installed" in warned[0] and "— fix: pip install nvidia-ml-py" in warned[0]


def test_gpu_columns_from_nvml(monkeypatch):
    """No GPU on the test machines: a stand-in NVML (the calls MLflow's GPUMonitor makes) checks
    that each GPU's values land in its own columns, in MLflow's units, and NVML is shut down."""
    from types import SimpleNamespace

    calls = []

    class NotSupported(Exception):
        pass

    fake = SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=(h + 1) * 2_000_000_000, total=8_000_000_000),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=40 + h) if h == 0 else (_ for _ in ()).throw(NotSupported()),
    )
    monkeypatch.setattr(_system, "_import_pynvml", lambda: fake)
    sampler = _system.HostSampler(3600.0)
    assert sampler.gpus == 2
    s = sampler.sample()
    sampler.close()
    assert calls == ["init", "shutdown"]
    got = {k: s[keys.SYSTEM_VECTOR.index(k)] for k in GPU_KEYS}
    p = keys.SYSTEM_PREFIX
    assert got[p + "gpu_0_utilization_percentage"] == 40.0
    assert math.isnan(got[p + "gpu_1_utilization_percentage"])  # not supported: NaN, its memory still logged
    assert got[p + "gpu_0_memory_usage_megabytes"] == 2000.0 and got[p + "gpu_1_memory_usage_megabytes"] == 4000.0
    assert got[p + "gpu_0_memory_usage_percentage"] == 25.0 and got[p + "gpu_1_memory_usage_percentage"] == 50.0
    assert all(math.isnan(got[k]) for k in GPU_KEYS if not k.startswith((p + "gpu_0_", p + "gpu_1_")))


def test_one_sampler_per_host():
    hosts = ["a", "a", "b", "b", "b", "c"]
    assert _system.sampler_ranks(hosts, list(range(6))) == {0, 2, 5}  # local rank 0 of each host
    assert _system.sampler_ranks(hosts, [0, 3]) == {0, 3}  # every 3rd rank has a run: b's is rank 3; c has none
    assert _system.sampler_ranks(hosts, []) == set()


def test_child_rows_skip_the_system_columns_of_ranks_that_sample_nothing():
    n = len(keys.RANK_VECTOR)
    rows = np.full((2, n), np.nan)
    rows[:, :7] = 1.0  # the dense keys
    sys0 = n - len(keys.SYSTEM_VECTOR)
    rows[0, sys0:sys0 + len(HOST_KEYS)] = 42.0  # rank 0 sampled its host
    ev = ChildRows(rows, [0, 1], ts=1, step=5, skip=frozenset({keys.LAYER_COMM_S})).events()
    got = [{m[0] for m in e["metrics"]} for e in ev]
    dense = {keys.SAMPLES_PER_SEC, keys.STEP_TIME_S, keys.DATA_TIME_S, keys.COMM_WAIT_S, keys.LOSS, keys.RSS_MB}
    assert got[0] == dense | set(HOST_KEYS)
    assert got[1] == dense


def test_tracker_samples_on_its_hosts_first_rank_and_follows_membership_changes():
    """The JobTracker wiring on a non-zero rank (no store needed): the sample rides in the gather
    vector once, a membership change that moves the host's first rank stops the sampler, and
    finish() stops it whatever the status (the elastic path and a failing job)."""
    from hvdkit.tracking import TrackingConfig, World
    from hvdkit.tracking._rank import NullWriter
    from hvdkit.tracking._tracker import JobTracker

    sent = []

    def gather(vec):
        sent.append(vec.copy())
        return np.tile(vec, (2, 1))

    cfg = TrackingConfig(system_metrics_interval_s=0.2, log_every=1)
    world = World(rank=1, size=2, local_rank=0, hostnames=["a", "b"])  # rank 1 is host b's only rank
    t = JobTracker(cfg, world, gather, lambda obj: {"run_id": "r", "job_id": "j"}, NullWriter(), None)
    t.start({}, {})
    assert t._sampler is not None and t._sampler.alive
    wait_until(lambda: t._sampler.samples >= 1, 30, "the sampler's first reading")
    step = dict(samples=32, step_time_s=0.01, data_time_s=0.0, comm_wait_s=0.0, loss=1.0)
    t.record_step(1, **step)
    t.record_step(2, **step)
    sys0 = len(keys.RANK_VECTOR) - len(keys.SYSTEM_VECTOR)
    assert np.isfinite(sent[0][sys0:sys0 + len(HOST_KEYS)]).all()  # a new sample: in this gather
    assert np.isnan(sent[1][sys0:]).all()  # none since: NaN, not a repeat
    sampler = t._sampler
    t.membership_changed(World(rank=1, size=2, local_rank=1, hostnames=["a", "a"]), 2)  # now host a's 2nd rank
    assert t._sampler is None and not sampler.alive
    t.membership_changed(World(rank=1, size=2, local_rank=0, hostnames=["a", "b"]), 3)
    sampler = t._sampler
    assert sampler is not None and sampler.alive
    t.finish("FAILED")
    assert t._sampler is None and not sampler.alive

    off = JobTracker(TrackingConfig(log_every=1), world, gather, lambda obj: {"run_id": "r", "job_id": "j"},
                     NullWriter(), None)  # TrackingConfig's default: off (hvdkit.autolog users)
    off.start({}, {})
    assert off._sampler is None
    off.finish("KILLED")


# -- real jobs ---------------------------------------------------------------------------------
def _job(tmp_path, *extra: str):
    uri = sqlite_store(tmp_path)
    started = time.monotonic()
    res = hvdkit(["run", DIGITS, "-np", "2", *QUICK, *extra], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri))
    wall = time.monotonic() - started
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri)
    runs = job_runs(client)
    roles = {}
    for r in runs:
        role = r.data.tags.get(keys.TAG_ROLE)
        roles[role if role == keys.ROLE_PARENT else f"rank{r.data.tags.get(keys.TAG_RANK)}"] = r
    assert set(roles) == {keys.ROLE_PARENT, "rank0", "rank1"}, sorted(roles)
    return client, roles, wall, res


@pytest.fixture(scope="module")
def sampled_job(tmp_path_factory):
    return _job(tmp_path_factory.mktemp("sysmetrics"), "log.system_metrics_interval_s=0.5")


def _system_keys(run) -> set[str]:
    return {k for k in run.data.metrics if k.startswith(keys.SYSTEM_PREFIX)}


@pytest.mark.horovod
def test_job_logs_host_metrics_on_local_rank_0_only(sampled_job):
    client, runs, _, _ = sampled_job
    rank0, rank1, parent = runs["rank0"], runs["rank1"], runs[keys.ROLE_PARENT]
    assert _system_keys(rank1) == set()  # same host: one sampler, not one per rank
    assert _system_keys(parent) == set()
    assert rank0.data.tags[keys.TAG_SYSTEM_METRICS_HOST] == rank0.data.tags[keys.TAG_HOST]
    assert keys.TAG_SYSTEM_METRICS_HOST not in rank1.data.tags
    # GPU keys only where a GPU and nvidia-ml-py are (this test's machines usually have neither)
    gpus = sum(1 for k in GPU_KEYS if k in rank0.data.metrics) // 3
    assert _system_keys(rank0) == set(HOST_KEYS) | set(GPU_KEYS[: 3 * gpus])

    gather_steps = {m.step for m in client.get_metric_history(rank0.info.run_id, keys.STEP_TIME_S)}
    hist = {k: client.get_metric_history(rank0.info.run_id, k) for k in _system_keys(rank0)}
    for k, points in hist.items():
        assert len(points) >= 2, (k, len(points))
        steps = [m.step for m in points]
        assert steps == sorted(set(steps)) and set(steps) <= gather_steps, (k, steps)  # at gathers, once each
        assert all(math.isfinite(m.value) for m in points), k
    val = {k: [m.value for m in sorted(p, key=lambda m: m.step)] for k, p in hist.items()}
    p = keys.SYSTEM_PREFIX
    assert all(0 <= v <= 100 for v in val[p + "cpu_utilization_percentage"])
    assert max(val[p + "cpu_utilization_percentage"]) > 10  # two ranks were training
    assert all(0 < v <= 100 for v in val[p + "system_memory_usage_percentage"] + val[p + "disk_usage_percentage"])
    assert all(v > 10 for v in val[p + "system_memory_usage_megabytes"])
    assert all(v > 0 for v in val[p + "disk_usage_megabytes"] + val[p + "disk_available_megabytes"])
    for k in ("network_receive_megabytes", "network_transmit_megabytes"):
        v = val[p + k]  # cumulative since the sampler started; Gloo's traffic goes over loopback
        assert v[0] >= 0 and all(b >= a for a, b in zip(v, v[1:])), (k, v)
        assert v[-1] > 0, (k, v)


@pytest.mark.horovod
def test_interval_0_logs_no_system_metrics(tmp_path, sampled_job):
    client, runs, _, _ = _job(tmp_path, "log.system_metrics_interval_s=0", "steps=60")
    for ref, run in runs.items():
        assert _system_keys(run) == set(), ref
        assert keys.TAG_SYSTEM_METRICS_HOST not in run.data.tags, ref
    assert runs["rank0"].data.metrics[keys.STEP_TIME_S] > 0  # the job itself was tracked
    # the parent's keys are the same with sampling on and off
    assert set(sampled_job[1][keys.ROLE_PARENT].data.metrics) == set(runs[keys.ROLE_PARENT].data.metrics)


@pytest.mark.job
def test_bad_interval_is_refused_before_any_job(tmp_path):
    res = hvdkit(["run", DIGITS, "-np", "2", "--no-track", "log.system_metrics_interval_s=-1"], cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "system_metrics_interval_s" in res.stderr


def test_tracking_config_checks_the_interval():
    from hvdkit.errors import UsageError
    from hvdkit.tracking import TrackingConfig, World
    from hvdkit.tracking._config import validate

    for bad in (-1.0, float("nan"), "10", True):
        with pytest.raises(UsageError, match="system_metrics_interval_s"):
            validate(TrackingConfig(system_metrics_interval_s=bad), World(rank=0, size=1))
    validate(TrackingConfig(system_metrics_interval_s=0.5), World(rank=0, size=1))

