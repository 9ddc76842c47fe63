"""A job's writer applies the spool from a child process (hvdkit/tracking/_apply_process.py).

Real child processes, a real sqlite MLflow store: the run ids come back to the writer as the child
creates the runs, the child ends with the writer, and a child killed mid-job loses nothing
(``hvdkit sync`` delivers the rest, once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow import MlflowClient

from hvdkit.tracking import sync_spool
from hvdkit.tracking import _apply_process
from hvdkit.tracking._apply_process import NICE
from hvdkit.tracking.keys import ENV_SQLITE_BULK_METRICS
from hvdkit.tracking._spool import Spool
from hvdkit.tracking._writer import SpoolWriter

from conftest import wait_until

try:
    from test_tracking_support import sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import sqlite_store


pytestmark = pytest.mark.job  # tests/_suite.py: starts processes


def _create(ref: str, parent: str | None = None) -> dict:
    return {"op": "create_run", "ref": ref, "parent_ref": parent, "parent_run_id": None, "experiment": "apply-proc",
            "run_name": ref, "tags": {"who": ref}, "start_time": 1_700_000_000_000}


def _losses(ref: str, steps: range) -> dict:
    return {"op": "log_batch", "ref": ref, "metrics": [["loss", 1.0 / s, 1_700_000_000_000 + s, s] for s in steps]}


def _history(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))


def test_the_child_applies_relays_run_ids_and_ends_with_the_writer(tmp_path):
    uri = sqlite_store(tmp_path)
    w = SpoolWriter(Spool.create(tmp_path / "spool", "job-1", uri), uri, apply_process=True)
    child = psutil.Process(w._applier.pid)
    assert child.ppid() == os.getpid() and child.nice() == NICE  # below training's priority
    assert uri not in " ".join(child.cmdline()) and uri not in child.environ().values()  # the target: on the pipe
    w.submit(_create("parent"))
    w.submit(_create("rank0", "parent"))
    parent_id = w.wait_for_run("parent", 60)
    assert parent_id is not None and w.run_ids.get("parent") == parent_id  # relayed before close
    for lo in range(1, 200, 20):
        w.submit(_losses("rank0", range(lo, lo + 20)))
    report = w.close(60)
    assert report.pending == 0 and report.spooled == 12 and report.applied == 12
    child.wait(5)  # gone, not orphaned
    assert not (tmp_path / "spool" / "job-1").exists()  # fully applied: the spool was only a buffer
    rank0 = w.run_ids["rank0"]
    assert _history(uri, rank0) == list(range(1, 201))
    assert MlflowClient(uri).get_run(rank0).data.tags["mlflow.parentRunId"] == parent_id


def test_a_killed_child_loses_nothing(tmp_path, capsys, caplog):
    uri = sqlite_store(tmp_path)
    spool_dir = tmp_path / "spool" / "job-2"
    w = SpoolWriter(Spool.create(tmp_path / "spool", "job-2", uri), uri, apply_process=True)
    w.submit(_create("parent"))
    parent_id = w.wait_for_run("parent", 60)
    assert parent_id is not None
    w.submit(_losses("parent", range(1, 51)))
    deadline = time.monotonic() + 60
    while w._applied < 2 and time.monotonic() < deadline:  # the first window is in
        time.sleep(0.05)
    os.kill(w._applier.pid, signal.SIGKILL)
    child = psutil.Process(w._applier.pid)  # dead once a zombie (its parent, the writer, reaps it)
    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 30, "the killed child's end")
    w.submit(_losses("parent", range(51, 101)))  # after the child died: spooled, not applied
    report = w.close(5)
    assert report.spooled == 3 and report.pending >= 1
    err = capsys.readouterr().err
    assert f"replay with: hvdkit sync {spool_dir}" in err
    said = [r.getMessage() for r in caplog.records if r.name == "hvdkit.tracking"]
    assert len(said) == 1 and "apply process" in said[0] and "exited with code -9" in said[0], said
    first = sync_spool(spool_dir, uri)
    assert first.applied == report.pending and first.applied + first.skipped == report.spooled
    assert _history(uri, parent_id) == list(range(1, 101))  # every point, none twice
    again = sync_spool(spool_dir, uri)
    assert again.applied == 0 and _history(uri, parent_id) == list(range(1, 101))


def test_a_prestarted_child_serves_the_writer_with_the_environment_set_after_it_started(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_SQLITE_BULK_METRICS, raising=False)
    monkeypatch.setenv("HVDKIT_TEST_GONE_LATER", "1")
    _apply_process.prestart()
    prestarted = _apply_process._prestarted[0].pid
    # Set after the child started: the opening message carries it (the child reports bulk metrics
    # only if it sees the opt-in), and what was unset meanwhile is unset there too.
    monkeypatch.setenv(ENV_SQLITE_BULK_METRICS, "1")
    monkeypatch.delenv("HVDKIT_TEST_GONE_LATER")
    uri = sqlite_store(tmp_path)
    w = SpoolWriter(Spool.create(tmp_path / "spool", "job-3", uri), uri, apply_process=True)
    assert w._applier.pid == prestarted and _apply_process._prestarted is None  # taken, not a second child
    child = psutil.Process(prestarted)
    assert child.nice() == NICE and "HVDKIT_TEST_GONE_LATER" in child.environ()  # its start environment
    w.submit(_create("parent"))
    w.submit(_losses("parent", range(1, 11)))
    parent_id = w.wait_for_run("parent", 60)
    report = w.close(60)
    assert parent_id is not None and report.pending == 0 and report.applied == 2
    assert w._applier.bulk_metrics is True  # the child read the opt-in set after it started
    assert _history(uri, parent_id) == list(range(1, 11))
    child.wait(5)


def test_a_prestarted_child_no_writer_took_ends_with_its_process():
    code = ("from hvdkit.tracking import _apply_process as a; a.prestart(); "
            "print(a._prestarted[0].pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    pid = int(out.stdout.split()[0])
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
               "the untaken child's end")
