"""The benchmarks run and say what they measured (behaviour, not timings): JSON lines that parse,
results with their ratio fields, and the closing table."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, hvdkit, sqlite_store, worker_env

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

RESULT_FIELDS = {"bench", "kind", "name", "unit", "median", "min", "max", "reps", "values", "goal", "ok"}


def _lines(stdout: str) -> tuple[list[dict], list[str]]:
    objs, rest = [], []
    for line in stdout.splitlines():
        if line.startswith("{"):
            objs.append(json.loads(line))  # every JSON line must parse
        elif line.strip():
            rest.append(line)
    return objs, rest


def _check_results(objs: list[dict], bench: str) -> list[dict]:
    assert objs[0]["kind"] == "machine" and objs[0]["cpus"] >= 1
    assert not [o for o in objs if o["kind"] == "error"], objs
    results = [o for o in objs if o["kind"] == "result"]
    assert results, objs
    for r in results:
        assert RESULT_FIELDS <= set(r), r
        assert r["bench"] == bench
        assert r["reps"] == len(r["values"]) >= 1
        assert r["min"] <= r["median"] <= r["max"]
    ratios = [r for r in results if r.get("ratio")]
    assert ratios, results
    for r in ratios:
        assert r["median"] > 0
        if r["goal"] and r["goal"].startswith((">=", "<=")):
            assert isinstance(r["ok"], bool)
    assert any(o["kind"] == "measurement" for o in objs)
    assert objs[-1]["kind"] == "timing" and objs[-1]["wall_s"] > 0
    return ratios


def test_writer_bench_quick_prints_json_lines_and_ratios(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench", "writer", "--quick"], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env=worker_env(TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    objs, table = _lines(res.stdout)
    ratios = _check_results(objs, "writer")
    assert {r["ratio"] for r in ratios} == {"capacity/offered"}
    paced = [o for o in objs if o.get("mode") == "paced"]
    assert paced and isinstance(paced[0]["keeps_up"], bool) and len(paced[0]["backlog_events"]) == paced[0]["intervals"]
    assert table[0].split()[:3] == ["bench", "result", "median"]  # the table closes the output
    assert any("capacity/offered" in line for line in table)


@pytest.mark.horovod
@pytest.mark.slow
def test_hvdkit_bench_ddp_quick_measures_both_sides(tmp_path):
    """hvdkit bench (the CLI command) runs a quick bench of real 2-rank jobs: hvdkit run and DDP."""
    res = hvdkit(["bench", "ddp", "--quick"], timeout=600, env=worker_env(TMPDIR=str(tmp_path)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    objs, _ = _lines(res.stdout)
    ratios = _check_results(objs, "ddp")
    assert [r["ratio"] for r in ratios] == ["hvdkit/ddp"]
    sides = {o["variant"] for o in objs if o["kind"] == "measurement"}
    assert sides == {"hvdkit", "ddp"}
    assert all(o["samples_per_sec"] > 0 for o in objs if o["kind"] == "measurement")


def test_hvdkit_bench_rejects_bad_reps():
    res = hvdkit(["bench", "writer", "--reps", "0"], timeout=60)
    assert res.returncode == 2
    assert "--reps 0 must be at least 1" in res.stderr


@pytest.mark.horovod
@pytest.mark.slow
def test_parallelism_bench_quick_counts_what_a_split_saves(tmp_path):
    """np=2 data parallel against model parallel (M=2), tiny MLP [64, 64]: the split rank holds its
    slice and averages no gradients; the counts come from the jobs and their MLflow runs."""
    uri = sqlite_store(tmp_path)
    res = subprocess.run([sys.executable, "-m", "bench", "parallelism", "--quick"], capture_output=True, text=True,
                         timeout=600, cwd=REPO, env=worker_env(TMPDIR=str(tmp_path), MLFLOW_TRACKING_URI=uri))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    objs, table = _lines(res.stdout)
    got = {o["layout"]: o for o in objs if o["kind"] == "measurement"}
    assert set(got) == {"np=2 data", "np=2 model"}, objs
    data, split = got["np=2 data"], got["np=2 model"]
    full = 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # digits' 64 inputs, [64, 64], 10 classes
    assert round(data["parameters_per_rank_m"] * 1e6) == full
    # column 64->32 and row 32->64 (its bias whole), the 64->10 output layer replicated
    assert round(split["parameters_per_rank_m"] * 1e6) == 64 * 32 + 32 + 32 * 64 + 64 + 64 * 10 + 10
    assert math.isclose(data["gradient_mb_per_step"], 4 * full / 1e6) and data["layer_mb_per_step"] == 0
    assert split["gradient_mb_per_step"] == 0 and math.isclose(split["layer_mb_per_step"], 32 * 64 * 4 / 1e6)
    assert all(o["samples_per_sec"] > 0 and o["peak_rss_mb_per_rank"] > 0 for o in got.values())
    assert any("np=2 model: parameters_per_rank_m" in line for line in table)
