"""``hvdkit scale``: a sweep over rank counts with scaling efficiency, on real jobs and a real store."""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from mlflow import MlflowClient

from conftest import BIN, REPO, hvdkit, worker_env
from hvdkit.tracking import keys, run_throughput

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

DIGITS = str(REPO / "recipes" / "digits.yaml")
QUICK = ["epochs=2", "log.progress=false", "checkpoint.dir=null"]
NOISE = ("oneDNN", "absl::", "cpu_feature_guard", "To enable the following")


def _tail(res: subprocess.CompletedProcess, n: int = 3000) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not any(s in ln for s in NOISE)]
    return "\n".join(lines)[-n:]


def _role(runs, role):
    return [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == role]


@pytest.mark.horovod
@pytest.mark.slow
def test_sweep_np_1_2_logs_efficiency_from_stored_throughputs(tmp_path):
    uri = sqlite_store(tmp_path)
    res = hvdkit(["scale", DIGITS, "--np", "1,2", *QUICK], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri))
    assert res.returncode == 0, _tail(res)
    client = MlflowClient(tracking_uri=uri)
    runs = job_runs(client)
    sweeps = _role(runs, keys.ROLE_SWEEP)
    assert len(sweeps) == 1
    sweep = sweeps[0]
    assert sweep.info.status == "FINISHED"
    sweep_id = sweep.info.run_id

    # one job per N, each nested under the sweep, in the sweep's experiment
    jobs = {int(r.data.tags[keys.TAG_WORLD_SIZE]): r for r in _role(runs, keys.ROLE_PARENT)}
    assert sorted(jobs) == [1, 2]
    for n, job in jobs.items():
        assert job.data.tags[keys.MLFLOW_PARENT_RUN_ID] == sweep_id
        assert job.info.experiment_id == sweep.info.experiment_id
        assert job.info.status == "FINISHED"
        children = [r for r in _role(runs, keys.ROLE_RANK) if r.data.tags[keys.MLFLOW_PARENT_RUN_ID] == job.info.run_id]
        assert len(children) == n

    # E(N) = T(N) / (N * T(1)), with T read back from the store
    t1 = run_throughput(client, jobs[1].info.run_id)
    t2 = run_throughput(client, jobs[2].info.run_id)
    assert t1 > 0 and t2 > 0
    eff = {m.step: m.value for m in client.get_metric_history(sweep_id, keys.SCALING_EFFICIENCY)}
    assert sorted(eff) == [1, 2]
    assert eff[1] == 1.0
    assert math.isclose(eff[2], t2 / (2 * t1), rel_tol=1e-12), (eff, t1, t2)
    tput = {m.step: m.value for m in client.get_metric_history(sweep_id, keys.SAMPLES_PER_SEC)}
    assert math.isclose(tput[1], t1, rel_tol=1e-12) and math.isclose(tput[2], t2, rel_tol=1e-12)
    # ... and on each job run; the np=2 job names the np=1 job as its baseline
    assert math.isclose(jobs[2].data.metrics[keys.SCALING_EFFICIENCY], eff[2], rel_tol=1e-12)
    assert jobs[2].data.tags[keys.TAG_BASELINE_RUN_ID] == jobs[1].info.run_id
    assert jobs[1].data.metrics[keys.SCALING_EFFICIENCY] == 1.0
    assert sweep.data.tags[keys.TAG_BASELINE_RUN_ID] == jobs[1].info.run_id

    # plot + CSV on the sweep run, in its report (tests/test_report.py checks the rest of it)
    assert [a.path for a in client.list_artifacts(sweep_id)] == ["report"]
    local = client.download_artifacts(sweep_id, "report/scaling.csv", str(tmp_path / "dl"))
    with open(local, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["np"]) for r in rows] == [1, 2]
    assert math.isclose(float(rows[1]["efficiency"]), eff[2], rel_tol=1e-9)
    assert rows[1]["run_id"] == jobs[2].info.run_id
    png = client.download_artifacts(sweep_id, "report/scaling.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the printed table
    assert re.search(r"│\s*2\s*│\s*[\d,.]+\s*│\s*" + re.escape(f"{eff[2]:.3f}"), res.stdout), res.stdout[-2000:]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--np", "0,2"], "is not a rank count >= 1"),
        (["--np", "x"], "is not a rank count >= 1"),
        (["--np", "2"], "has no 1 and experiment 'hvdkit' holds no finished np=1 run"),
        (["--np", "1,2", "--baseline", "abc"], "the sweep's own np=1 job is its baseline"),
        (["--np", "2", "--baseline", "0123456789abcdef0123456789abcdef"], "unknown --baseline run ID"),
    ],
)
def test_sweep_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, args, needle):
    uri = sqlite_store(tmp_path)
    res = hvdkit(["scale", DIGITS, *args, *QUICK], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri), timeout=120)
    assert res.returncode == 2, _tail(res)
    assert needle in res.stderr and "fix:" in res.stderr, res.stderr
    assert job_runs(MlflowClient(tracking_uri=uri)) == []


FAILING = '''
import os
from hvdkit.recipe import PythonRecipe


class Failing(PythonRecipe):
    config = {"name": "failing", "model": {"name": "custom"}, "data": {"name": "digits"}, "steps": 50,
              "log": {"every_steps": 5, "progress": False}, "eval": {"enabled": False}}

    def build_model(self, framework, input_shape, num_classes):
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(64, num_classes)
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                if self.calls > 12:
                    raise RuntimeError("injected failure")
                return self.lin(x.flatten(1))

        return Model()
'''


@pytest.mark.horovod
def test_a_failing_job_ends_the_sweep_failed(tmp_path):
    uri = sqlite_store(tmp_path)
    recipe = tmp_path / "failing.py"
    recipe.write_text(FAILING)
    res = hvdkit(["scale", str(recipe), "--np", "1,2"], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri))
    assert res.returncode == 1, _tail(res)
    assert "sweep FAILED: job np=1 FAILED" in res.stderr, _tail(res)
    runs = job_runs(MlflowClient(tracking_uri=uri))
    sweep = _role(runs, keys.ROLE_SWEEP)
    jobs = _role(runs, keys.ROLE_PARENT)
    assert len(sweep) == 1 and sweep[0].info.status == "FAILED"
    assert len(jobs) == 1 and jobs[0].info.status == "FAILED"  # np=2 never started
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.horovod
def test_interrupting_the_sweep_ends_it_killed(tmp_path):
    uri = sqlite_store(tmp_path)
    proc = subprocess.Popen([str(BIN / "hvdkit"), "scale", DIGITS, "--np", "1,2", "epochs=1000", "log.progress=false",
                             "checkpoint.dir=null"], cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    client = MlflowClient(tracking_uri=uri)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = _role(job_runs(client), keys.ROLE_PARENT)
            if jobs and keys.SAMPLES_PER_SEC in jobs[0].data.metrics:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the np=1 job logged nothing: " + "".join(out[-30:]))
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C during the np=1 job
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130, "".join(out[-30:])
    runs = job_runs(client)
    sweep, jobs = _role(runs, keys.ROLE_SWEEP), _role(runs, keys.ROLE_PARENT)
    assert len(sweep) == 1 and sweep[0].info.status == "KILLED"
    assert len(jobs) == 1 and jobs[0].info.status == "KILLED"  # np=2 never started
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.horovod
@pytest.mark.slow
def test_a_sweep_without_np_1_takes_a_baseline_of_its_jobs_host_type(tmp_path):
    """The launcher imports no framework, so it cannot know the jobs' accelerator: a stored np=1
    run of another host type (here one tagged as a GPU job) is no baseline for this sweep's CPU
    jobs, and the sweep says so instead of dividing by it; a run of the jobs' own type is used."""
    from hvdkit.tracking import host_type

    uri = sqlite_store(tmp_path)
    env = worker_env(MLFLOW_TRACKING_URI=uri)
    res = hvdkit(["run", DIGITS, "-np", "1", "--framework", "torch", *QUICK], cwd=tmp_path, env=env)
    assert res.returncode == 0, _tail(res)
    client = MlflowClient(tracking_uri=uri)
    (one,) = _role(job_runs(client), keys.ROLE_PARENT)
    cpu_type = one.data.tags[keys.TAG_HOST_TYPE]
    assert cpu_type == host_type()  # a CPU job: no accelerator in its host type
    gpu_type = host_type("NVIDIA H100 80GB HBM3")
    client.set_tag(one.info.run_id, keys.TAG_HOST_TYPE, gpu_type)

    res = hvdkit(["scale", DIGITS, "--np", "2", "--framework", "torch", *QUICK], cwd=tmp_path, env=env)
    assert res.returncode == 1, _tail(res)
    assert f"no finished np=1 run of recipe 'digits' on host type {cpu_type!r}" in res.stderr, _tail(res)
    (sweep,) = _role(job_runs(client), keys.ROLE_SWEEP)
    assert sweep.info.status == "FAILED"
    assert keys.SCALING_EFFICIENCY not in client.get_run(sweep.info.run_id).data.metrics

    client.set_tag(one.info.run_id, keys.TAG_HOST_TYPE, cpu_type)
    res = hvdkit(["scale", DIGITS, "--np", "2", "--framework", "torch", *QUICK], cwd=tmp_path, env=env)
    assert res.returncode == 0, _tail(res)
    sweep = next(s for s in _role(job_runs(client), keys.ROLE_SWEEP) if s.info.status == "FINISHED")
    assert sweep.data.tags[keys.TAG_BASELINE_RUN_ID] == one.info.run_id
    assert sweep.data.tags[keys.TAG_HOST_TYPE] == cpu_type
    eff = {m.step: m.value for m in client.get_metric_history(sweep.info.run_id, keys.SCALING_EFFICIENCY)}
    t1, t2 = run_throughput(client, one.info.run_id), client.get_metric_history(sweep.info.run_id, keys.SAMPLES_PER_SEC)[0].value
    assert sorted(eff) == [2] and math.isclose(eff[2], t2 / (2 * t1), rel_tol=1e-12)
