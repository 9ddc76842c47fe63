"""Many ranks on few cores: np=8 oversubscribed on a 2-core machine, a real horovodrun job
(Gloo, torch) writing to a real sqlite store, read back from MLflow."""

from __future__ import annotations

import math
import os
import re
import subprocess
import time

import pytest
from mlflow import MlflowClient

from conftest import REPO, hvdkit, worker_env
from hvdkit.tracking import keys

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

pytestmark = [pytest.mark.horovod, pytest.mark.slow]

DIGITS = str(REPO / "recipes" / "digits.yaml")
NP = 8
STEPS = 12
LOG_EVERY = 4
NOISE = ("oneDNN", "absl::", "cpu_feature_guard", "To enable the following")


def _tail(res: subprocess.CompletedProcess, n: int = 4000) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not any(s in ln for s in NOISE)]
    return f"exit {res.returncode}\n" + "\n".join(lines)[-n:]


def _history(client, run_id, key) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_np8_oversubscribed_on_few_cores(tmp_path):
    uri = sqlite_store(tmp_path)
    t0 = time.perf_counter()
    res = hvdkit(["run", DIGITS, "-np", str(NP), "--framework", "torch", "--log-every", str(LOG_EVERY),
                  f"steps={STEPS}", "log.progress=false", "checkpoint.dir=null", "eval.enabled=false"],
                 cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri), timeout=900)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, _tail(res)
    assert int(re.search(r"steps\s*│\s*(\d+)", res.stdout).group(1)) == STEPS, _tail(res)
    expect_steps = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))

    client = MlflowClient(tracking_uri=uri)
    runs = job_runs(client)
    parents = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    children = sorted((r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK),
                      key=lambda r: int(r.data.tags[keys.TAG_RANK]))
    assert len(parents) == 1 and len(children) == NP and len(runs) == NP + 1, [r.info.run_name for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    parent = parents[0]
    assert [c.data.tags[keys.TAG_RANK] for c in children] == [str(r) for r in range(NP)]
    assert parent.data.tags[keys.TAG_WORLD_SIZE] == str(NP)
    assert parent.data.metrics[keys.WORLD_SIZE] == NP

    per_rank = ("samples_per_sec", "step_time_s", "loss")
    c_sps = []
    for r, child in enumerate(children):
        assert child.info.run_name == f"rank-{r}"
        assert child.data.tags[keys.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.data.tags[keys.TAG_JOB_ID] == parent.data.tags[keys.TAG_JOB_ID]
        for key in per_rank:
            hist = _history(client, child.info.run_id, key)
            assert sorted(hist) == expect_steps, (r, key, sorted(hist))
            assert all(math.isfinite(v) and v > 0 for v in hist.values()), (r, key, hist)
        c_sps.append(_history(client, child.info.run_id, keys.SAMPLES_PER_SEC))

    # the parent's throughput is the measured sum over the 8 ranks, at every gathered step
    p_sps = _history(client, parent.info.run_id, keys.SAMPLES_PER_SEC)
    assert sorted(p_sps) == expect_steps
    worst = 0.0
    for step in expect_steps:
        total = math.fsum(h[step] for h in c_sps)
        worst = max(worst, abs(p_sps[step] - total) / total)
        assert math.isclose(p_sps[step], total, rel_tol=1e-9), (step, p_sps[step], total)
    print(f"np={NP} on {os.cpu_count()} cores: {wall:.1f}s, {len(children)} child runs, "
          f"max rel diff parent vs sum {worst:.2e}")
    assert not list(tmp_path.glob("hvdkit-spool/*")), "a fully applied spool is removed"
