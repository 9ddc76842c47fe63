"""``hvdkit plan``: the ring-allreduce cost model (pure units), and one real np=1 job planned with a
real allreduce probe (np=2 under horovodrun), its table logged on the job's run."""

from __future__ import annotations

import csv
import math
import subprocess

import pytest
from mlflow import MlflowClient

from conftest import REPO, hvdkit, worker_env
from hvdkit import plan as P
from hvdkit.errors import UsageError
from hvdkit.tracking import keys

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

DIGITS = str(REPO / "recipes" / "digits.yaml")



# -- the model ---------------------------------------------------------------------------------
def test_ring_allreduce_cost():
    assert P.ring_allreduce_time(1, 1e9, 1e-3, 1e9) == 0.0  # one rank: nothing to reduce
    # N=4, 8 MB, alpha 50 us, B 1 GB/s: 2*3*50e-6 + 2*3/4 * 8e6/1e9
    assert math.isclose(P.ring_allreduce_time(4, 8e6, 50e-6, 1e9), 6 * 50e-6 + 1.5 * 8e-3, rel_tol=1e-12)
    # the bandwidth term tends to 2 * bytes / B, the latency term grows linearly
    assert math.isclose(P.ring_allreduce_time(1000, 1e6, 0.0, 1e9), 2 * 999 / 1000 * 1e-3, rel_tol=1e-12)
    with pytest.raises(UsageError):
        P.ring_allreduce_time(0, 1.0, 0.0, 1.0)


def test_bus_bandwidth_as_nccl_tests():
    # 64 MiB in 0.1 s over 8 ranks: algbw = S/t, busbw = algbw * 2*7/8
    s = 64 * 2**20
    assert math.isclose(P.algorithm_bandwidth(s, 0.1), s / 0.1)
    assert math.isclose(P.bus_bandwidth(s, 0.1, 8), s / 0.1 * 14 / 8)
    assert math.isclose(P.bus_bandwidth(s, 0.1, 2), s / 0.1)  # n=2: busbw == algbw


def test_fit_recovers_latency_and_bandwidth():
    alpha, bw = 300e-6, 2.5e9
    for n in (2, 4):
        pts = [(float(s), P.ring_allreduce_time(n, s, alpha, bw)) for s in P_SIZES]
        a, b = P.fit_ring(pts, n)
        assert math.isclose(a, alpha, rel_tol=1e-6) and math.isclose(b, bw, rel_tol=1e-6)
    # the busbw of a large message approaches the fitted B
    s = P_SIZES[-1]
    assert math.isclose(P.bus_bandwidth(s, P.ring_allreduce_time(2, s, alpha, bw), 2), bw, rel_tol=0.05)


P_SIZES = [4 << 10 << (2 * i) for i in range(8)]


def test_predictions_fall_with_n_and_rise_with_network_speed():
    prof = P.JobProfile("r", 1, 32, compute_s=2e-3, data_s=1e-4, grad_bytes=4e6, controller="gloo")
    nps = [1, 2, 4, 8, 64, 512]
    for net in ("10gbit", "100gbit"):
        preds = [P.predict(prof, n, net, P.NETWORKS[net], 100e-6, cores=16, ranks_per_host=1) for n in nps]
        assert preds[0].efficiency == 1.0 and preds[0].comm_s == 0.0
        assert all(a.step_s < b.step_s for a, b in zip(preds, preds[1:]))
        assert all(a.efficiency > b.efficiency for a, b in zip(preds, preds[1:]))
    for n in nps[1:]:
        slow = P.predict(prof, n, "10gbit", P.NETWORKS["10gbit"], 100e-6, cores=16, ranks_per_host=1)
        fast = P.predict(prof, n, "100gbit", P.NETWORKS["100gbit"], 100e-6, cores=16, ranks_per_host=1)
        assert fast.efficiency > slow.efficiency
    # 4 ranks on 2 cores: each gets half a core, compute doubles
    over = P.predict(prof, 4, "local", 1e9, 100e-6, cores=2, ranks_per_host=4)
    assert math.isclose(over.local_s, 2 * prof.local_s)
    assert P.parse_networks("10gbit, LOCAL,10gbit") == ["10gbit", "local"]
    with pytest.raises(UsageError, match="unknown network 'infiniband'"):
        P.parse_networks("10gbit,infiniband")


# -- a real job and a real probe -----------------------------------------------------------------
def _tail(res: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (res.stdout + res.stderr)[-n:]


@pytest.fixture(scope="module")
def job(digits_sweep):
    """The sweep's np=1 job: what `hvdkit plan` predicts from."""
    tmp, uri, env = digits_sweep["tmp"], digits_sweep["uri"], digits_sweep["env"]
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [r for r in job_runs(client) if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT
                 and r.data.tags.get(keys.TAG_WORLD_SIZE) == "1"]
    return {"tmp": tmp, "uri": uri, "env": env, "client": client, "run": parent}


@pytest.mark.horovod
@pytest.mark.slow
def test_plan_of_a_real_job_with_a_real_probe(job):
    client, run_id = job["client"], job["run"].info.run_id
    nets, nps = ["10gbit", "100gbit", "local"], [1, 2, 4, 8]
    res = hvdkit(["plan", run_id, "--network", ",".join(nets), "--np", "1,2,4,8"], cwd=job["tmp"], env=job["env"],
                 timeout=240)
    assert res.returncode == 0, _tail(res)
    assert "allreduce probe: np=2, gloo" in res.stdout
    assert "(no compute/communication overlap)" in res.stdout
    got = sorted(a.path for a in client.list_artifacts(run_id, "plan"))
    assert got == ["plan/plan.csv", "plan/plan.md", "plan/plan.png", "plan/probe.csv"]
    local = client.download_artifacts(run_id, "plan", str(job["tmp"] / "dl"))
    with open(f"{local}/plan.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["network"], int(r["np"])) for r in rows) == sorted((w, n) for w in nets for n in nps)
    step = {(r["network"], int(r["np"])): float(r["step_s"]) for r in rows}
    eff = {(r["network"], int(r["np"])): float(r["efficiency"]) for r in rows}
    for w in nets:
        assert eff[(w, 1)] == 1.0
        assert all(step[(w, a)] < step[(w, b)] for a, b in zip(nps, nps[1:])), (w, step)
        assert all(eff[(w, a)] > eff[(w, b)] for a, b in zip(nps, nps[1:])), (w, eff)
    for n in nps[1:]:
        assert step[("100gbit", n)] < step[("10gbit", n)]

    # the inputs are the job's: compute = step - comm wait of its rank run, gradients = parameters x 4
    (rank,) = [r for r in job_runs(client) if r.data.tags.get(keys.MLFLOW_PARENT_RUN_ID) == run_id]
    prof = P.job_profile(client, run_id)
    assert prof.grad_bytes == rank.data.metrics[keys.PARAMETERS] * 4 and prof.batch_size == 32
    assert math.isclose(float(rows[0]["local_s"]), prof.compute_s + prof.data_s, rel_tol=1e-9)
    # the probe: 8 sizes, busbw of each, a fit with a positive latency and bandwidth
    with open(f"{local}/probe.csv", newline="") as f:
        probe = list(csv.DictReader(f))
    assert [int(p["bytes"]) for p in probe] == P_SIZES
    assert all(float(p["seconds"]) > 0 and float(p["busbw_Bps"]) > 0 for p in probe)
    assert "bus bandwidth" in open(f"{local}/plan.md").read()
    # the printed table has a row per network x N
    for w in nets:
        assert sum(1 for ln in res.stdout.splitlines() if ln.startswith(f"│ {w} ")) == len(nps), res.stdout


@pytest.mark.horovod
@pytest.mark.slow
def test_plan_bad_input_is_one_line_exit_2(job):
    from click.testing import CliRunner

    from hvdkit.cli import main

    client = job["client"]
    # a job run without rank runs, in an experiment of its own: the sweep's experiment is shared
    # with test_report and test_ui_browser (conftest.digits_sweep), which read every job run in it
    empty = client.create_run(client.create_experiment("plan-bad-input"), tags={keys.TAG_ROLE: keys.ROLE_PARENT}).info.run_id
    run_id = job["run"].info.run_id
    cases = [
        (["--network", "10gbit,infiniband"], run_id, "unknown network 'infiniband'"),
        (["--np", "0,2"], run_id, "is not a rank count >= 1"),
        ([], empty, "has no step_time_s on its rank runs"),
        ([], "0123456789abcdef0123456789abcdef", "unknown run ID"),
    ]
    for args, rid, needle in cases:
        res = CliRunner().invoke(main, ["plan", rid, "--tracking-uri", job["uri"], *args])
        assert res.exit_code == 2, (args, res.output, res.exception)
        err = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: error:")]
        assert len(err) == 1 and "fix:" in err[0] and needle in err[0], res.stderr
    assert not [a for a in client.list_artifacts(empty)]  # nothing logged, no probe run
