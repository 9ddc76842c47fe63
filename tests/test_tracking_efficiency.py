"""Scaling efficiency: the math, the np=1 baseline lookup, the sweep plot and table."""

from __future__ import annotations

import csv
import math
import re

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from hvdkit.errors import TrackingError, UsageError
from hvdkit.tracking import find_baseline, host_type, keys, run_throughput, scaling_efficiency, write_sweep_artifacts
from hvdkit.tracking.efficiency import history_throughput

try:
    from test_tracking_support import sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import sqlite_store

HOST = "x86_64-8cpu-test"


def test_efficiency_math():
    assert scaling_efficiency(360.0, 4, 100.0) == pytest.approx(0.9)
    assert scaling_efficiency(100.0, 1, 100.0) == 1.0
    with pytest.raises(UsageError):
        scaling_efficiency(1.0, 0, 1.0)
    with pytest.raises(UsageError):
        scaling_efficiency(1.0, 2, 0.0)
    assert history_throughput([10.0, 100.0, 110.0]) == 105.0  # warm-up interval dropped
    assert history_throughput([42.0]) == 42.0
    assert history_throughput([]) is None


def test_host_type_is_stable_and_slugged():
    a, b = host_type(), host_type()
    assert a == b and re.fullmatch(r"[A-Za-z0-9_]+-\d+cpu-[a-z0-9-]*", a)
    assert host_type("NVIDIA H100 80GB HBM3").endswith("-nvidia-h100-80gb-hbm3")


@pytest.fixture
def client(tmp_path):
    return MlflowClient(sqlite_store(tmp_path))


def _job(client, exp, *, np_, recipe="mnist", framework="torch", batch=64, host=HOST, status="FINISHED", sps=(50.0, 100.0, 102.0), start=0):
    run = client.create_run(
        exp,
        start_time=1_000 + start,
        tags={
            keys.TAG_ROLE: keys.ROLE_PARENT,
            keys.TAG_WORLD_SIZE: str(np_),
            keys.TAG_RECIPE: recipe,
            keys.TAG_FRAMEWORK: framework,
            keys.TAG_BATCH_SIZE: str(batch),
            keys.TAG_HOST_TYPE: host,
        },
    )
    rid = run.info.run_id
    client.log_batch(rid, [Metric(keys.SAMPLES_PER_SEC, v, 2_000 + i, (i + 1) * 10) for i, v in enumerate(sps)])
    client.set_terminated(rid, status)
    return rid


def test_baseline_lookup(client):
    exp = client.create_experiment("eff")
    assert find_baseline(client, exp, "mnist", "torch", 64, HOST) is None
    old = _job(client, exp, np_=1, sps=(10.0, 80.0), start=1)
    best = _job(client, exp, np_=1, sps=(10.0, 100.0, 110.0), start=2)
    _job(client, exp, np_=1, status="RUNNING", start=3)  # not finished
    _job(client, exp, np_=1, status="FAILED", start=4)
    _job(client, exp, np_=2, start=5)  # not np=1
    _job(client, exp, np_=1, host="other-host", start=6)
    _job(client, exp, np_=1, batch=32, start=7)
    _job(client, exp, np_=1, framework="tensorflow", start=8)
    _job(client, exp, np_=1, recipe="cifar", start=9)
    base = find_baseline(client, exp, "mnist", "torch", 64, HOST)
    assert base is not None and base.run_id == best and base.samples_per_sec == 105.0
    assert run_throughput(client, old) == 80.0

    explicit = find_baseline(client, exp, "mnist", "torch", 64, HOST, run_id=old)
    assert explicit.run_id == old and explicit.samples_per_sec == 80.0
    with pytest.raises(TrackingError, match="unknown --baseline run ID"):
        find_baseline(client, exp, "mnist", "torch", 64, HOST, run_id="0123456789abcdef0123456789abcdef")
    cifar = _job(client, exp, np_=1, recipe="cifar", start=10)
    with pytest.raises(TrackingError, match=r"'cifar'.*'mnist'"):
        find_baseline(client, exp, "mnist", "torch", 64, HOST, run_id=cifar)


def test_sweep_artifacts(tmp_path):
    rows = [
        {"np": 4, "samples_per_sec": 360.0, "efficiency": 0.9, "run_id": "c"},
        {"np": 1, "samples_per_sec": 100.0, "efficiency": 1.0, "run_id": "a"},
        {"np": 2, "samples_per_sec": 190.0, "efficiency": 0.95, "run_id": "b"},
    ]
    png, table = write_sweep_artifacts(rows, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    with open(table) as f:
        got = list(csv.DictReader(f))
    assert [r["np"] for r in got] == ["1", "2", "4"]
    assert list(got[0]) == ["np", "samples_per_sec", "efficiency", "run_id"]
    assert math.isclose(float(got[2]["efficiency"]), 0.9) and got[2]["run_id"] == "c"
    with pytest.raises(UsageError):
        write_sweep_artifacts([], tmp_path / "empty")
