"""The scalability report of a sweep (``hvdkit scale`` attaches it, ``hvdkit report`` rebuilds it),
on one real np=1,2 sweep and a real MLflow store: every number in it is read back and compared with
the stored metrics."""

from __future__ import annotations

import csv
import math
import re
import subprocess

import pytest
from mlflow import MlflowClient

from conftest import REPO, hvdkit, worker_env
from hvdkit.tracking import keys, run_throughput

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

DIGITS = str(REPO / "recipes" / "digits.yaml")
PNGS = ("breakdown.png", "scaling.png", "straggler.png")


def _tail(res: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (res.stdout + res.stderr)[-n:]


def _warm(client, run_id, key):
    # independent of hvdkit.report: the interval means, first (warm-up) interval dropped
    vals = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
    vals = vals[1:] if len(vals) >= 2 else vals
    return sum(vals) / len(vals)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(digits_sweep):
    tmp, uri, env = digits_sweep["tmp"], digits_sweep["uri"], digits_sweep["env"]
    client = MlflowClient(tracking_uri=uri)
    runs = job_runs(client)
    (sw,) = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_SWEEP]
    jobs = {int(r.data.tags[keys.TAG_WORLD_SIZE]): r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT}
    ranks = {n: [r for r in runs if r.data.tags.get(keys.MLFLOW_PARENT_RUN_ID) == job.info.run_id] for n, job in jobs.items()}
    return {"tmp": tmp, "uri": uri, "env": env, "client": client, "sweep": sw, "jobs": jobs, "ranks": ranks}


@pytest.mark.horovod
@pytest.mark.slow
def test_the_sweep_run_holds_the_report_with_the_stored_numbers(sweep):
    client, sweep_id = sweep["client"], sweep["sweep"].info.run_id
    assert sorted(a.path for a in client.list_artifacts(sweep_id)) == ["report"]
    got = sorted(a.path for a in client.list_artifacts(sweep_id, "report"))
    assert got == sorted(f"report/{f}" for f in ("report.html", "scaling.csv", "ranks.csv", *PNGS))
    dl = sweep["tmp"] / "dl"
    local = client.download_artifacts(sweep_id, "report", str(dl))
    for png in PNGS:
        data = open(f"{local}/{png}", "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, png

    rows = {int(r["np"]): r for r in _read_csv(f"{local}/scaling.csv")}
    assert sorted(rows) == [1, 2]
    eff = {m.step: m.value for m in client.get_metric_history(sweep_id, keys.SCALING_EFFICIENCY)}
    for n, job in sweep["jobs"].items():
        row, jid = rows[n], job.info.run_id
        assert row["run_id"] == jid and row["status"] == "FINISHED"
        t = run_throughput(client, jid)
        assert math.isclose(float(row["samples_per_sec"]), t, rel_tol=1e-12)
        assert math.isclose(float(row["efficiency"]), eff[n], rel_tol=1e-12)
        assert math.isclose(float(row["speedup"]), t / run_throughput(client, sweep["jobs"][1].info.run_id), rel_tol=1e-12)
        assert math.isclose(float(row["straggler_ratio"]), _warm(client, jid, keys.STRAGGLER_RATIO), rel_tol=1e-12)
        children = sweep["ranks"][n]
        assert len(children) == n
        for key, col in ((keys.STEP_TIME_S, "step_time_s"), (keys.DATA_TIME_S, "data_time_s"), (keys.COMM_WAIT_S, "comm_wait_s")):
            want = sum(_warm(client, c.info.run_id, key) for c in children) / n
            assert math.isclose(float(row[col]), want, rel_tol=1e-9), (n, col)
        # compute is the step less its communication wait (comm_wait_s is inside step_time_s)
        assert math.isclose(float(row["compute_s"]) + float(row["comm_wait_s"]), float(row["step_time_s"]), rel_tol=1e-9)
        assert float(row["compute_s"]) > 0
    assert float(rows[2]["comm_wait_s"]) > float(rows[1]["comm_wait_s"])  # an np=1 allreduce waits on no one

    ranks = _read_csv(f"{local}/ranks.csv")
    assert sorted((int(r["np"]), int(r["rank"])) for r in ranks) == [(1, 0), (2, 0), (2, 1)]
    for r in ranks:
        rid = r["run_id"]
        assert math.isclose(float(r["comm_wait_s"]), _warm(client, rid, keys.COMM_WAIT_S), rel_tol=1e-12)
        assert math.isclose(float(r["compute_s"]), _warm(client, rid, keys.STEP_TIME_S) - _warm(client, rid, keys.COMM_WAIT_S),
                            rel_tol=1e-9)

    page = open(f"{local}/report.html", encoding="utf-8").read()
    for png in PNGS:  # relative paths: the page opens from MLflow's artifact view
        assert f'<img src="{png}"' in page
    assert '<table id="scaling">' in page and sweep_id in page
    assert re.search(r"<tr><td>2</td><td>[\d,.]+</td><td>[\d.]+</td><td>2</td><td>" + re.escape(f"{eff[2]:.3f}"), page), page


@pytest.mark.horovod
@pytest.mark.slow
def test_hvdkit_report_rebuilds_the_same_numbers_from_the_store(sweep):
    client, sweep_id = sweep["client"], sweep["sweep"].info.run_id
    before = _read_csv(client.download_artifacts(sweep_id, "report/scaling.csv", str(sweep["tmp"] / "before")))
    out = sweep["tmp"] / "rebuilt"
    res = hvdkit(["report", sweep_id, "--out", str(out)], cwd=sweep["tmp"], env=sweep["env"], timeout=120)
    assert res.returncode == 0, _tail(res)
    assert "2 job(s), N = 1, 2" in res.stdout, res.stdout
    rebuilt = _read_csv(out / "scaling.csv")
    assert rebuilt == before
    assert (out / "report.html").is_file() and all((out / p).is_file() for p in PNGS)
    # logged to the sweep run again: the same paths, the same numbers
    again = _read_csv(client.download_artifacts(sweep_id, "report/scaling.csv", str(sweep["tmp"] / "again")))
    assert again == before


@pytest.mark.horovod
@pytest.mark.slow
def test_report_of_a_bad_sweep_id_is_one_line_exit_2(sweep):
    # In-process (click's runner, the same command): a subprocess would spend its time importing MLflow.
    from click.testing import CliRunner

    from hvdkit.cli import main

    for run_id, needle in (("0123456789abcdef0123456789abcdef", "unknown sweep run ID"),
                           (sweep["jobs"][2].info.run_id, "is not a sweep run")):
        res = CliRunner().invoke(main, ["report", run_id, "--tracking-uri", sweep["uri"]])
        assert res.exit_code == 2, (res.output, res.exception)
        err = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: error:")]
        assert len(err) == 1 and "fix:" in err[0] and needle in err[0], res.stderr
