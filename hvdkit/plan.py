"""``hvdkit plan RUN_ID``: predict step time and scaling efficiency at other sizes and networks.

Inputs, all measured:

- the job (a tracked run): per-step local time ``t_local`` = compute (``step_time_s - comm_wait_s``)
  + data wait (``data_time_s``), warm means over its rank runs; gradient bytes per step = the rank
  runs' ``parameters`` x 4 (fp32 gradients); per-rank batch size from its tags.
- an allreduce probe of the job's controller (``hvdkit/torch/_probe.py``, np=2 on this host under
  horovodrun): the time of ``hvd.allreduce`` over 4 KiB..64 MiB, fitted to the ring cost
  ``t(S) = 2(n-1)·α + 2(n-1)/n · S/B`` (weighted least squares, relative error), giving the latency
  α and the bus bandwidth B (nccl-tests' busbw = algbw x 2(n-1)/n, algbw = S/t).

Model (ring allreduce, fixed per-rank batch):

- ``t_comm(N) = 2(N-1)·α + 2(N-1)/N · bytes / B``, B the named network's link speed (``local``: the
  probe's B). α is the probe's for every network: Horovod's per-collective software cost (its
  cycle, the controller's negotiation) measured here is far above a wire's few microseconds.
- ``t_step(N) = t_local · k + t_comm(N)`` with ``k = max(1, ranks_per_host / cores)``: ranks
  sharing a host's cores share its compute (``local`` puts all N ranks on this host; a named
  network puts ``--ranks-per-host`` on each host). α, Horovod's and the controller's CPU time per
  hop, is scaled by the same k (relative to the probe's own ranks per core); B is not.
- no overlap of communication with compute: hvdkit's ``comm_wait_s`` is the time blocked after the
  backward pass, and counting all of t_comm as blocked bounds the step time from above.
- ``E(N) = t_step(1) / t_step(N)``, with ``t_step(1) = t_local`` (no allreduce at N=1).

Framework-free (entry layer): the probe runs as a separate horovodrun job.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hvdkit.errors import LaunchError, TrackingError, UsageError
from hvdkit.tracking import keys

ARTIFACT_DIR = "plan"
BYTES_PER_PARAM = 4  # fp32 gradients
PROBE_NP = 2
LOCAL = "local"
# Link speeds in bytes/s (1 Gbit/s = 1.25e8 B/s).
NETWORKS: dict[str, float] = {f"{g}gbit": g * 1.25e8 for g in (1, 10, 25, 40, 100, 200, 400)}


# -- the cost model (pure) -------------------------------------------------------------------------
def ring_allreduce_time(n: int, nbytes: float, alpha: float, bandwidth: float) -> float:
    """Seconds for a ring allreduce of ``nbytes`` over ``n`` ranks: ``2(n-1)α + 2(n-1)/n · nbytes/B``."""
    if n < 1:
        raise UsageError(f"rank count {n} < 1", fix="pass rank counts >= 1")
    if n == 1:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bandwidth


def algorithm_bandwidth(nbytes: float, seconds: float) -> float:
    return nbytes / seconds


def bus_bandwidth(nbytes: float, seconds: float, n: int) -> float:
    """nccl-tests' busbw for allreduce: ``algbw x 2(n-1)/n``, comparable across rank counts."""
    return algorithm_bandwidth(nbytes, seconds) * 2 * (n - 1) / n


def fit_ring(points: Sequence[tuple[float, float]], n: int) -> tuple[float, float]:
    """(α seconds, B bytes/s) of ``t(S) = a + b·S`` fitted to (S, t) points, a = 2(n-1)α,
    b = 2(n-1)/(n B). Least squares on the relative error, so 4 KiB and 64 MiB weigh alike."""
    if n < 2 or len(points) < 2:
        raise UsageError("an allreduce fit needs n >= 2 and two sizes or more", fix="rerun the probe")
    # minimise sum(((a + b S - t) / t)^2): weighted normal equations with w = 1/t^2
    sw = swx = swxx = swy = swxy = 0.0
    for s, t in points:
        w = 1.0 / (t * t)
        sw, swx, swxx, swy, swxy = sw + w, swx + w * s, swxx + w * s * s, swy + w * t, swxy + w * s * t
    det = sw * swxx - swx * swx
    b = (sw * swxy - swx * swy) / det
    a = (swy - b * swx) / sw
    if b <= 0:  # no measurable size dependence: bandwidth from the largest message alone
        s, t = max(points)
        b = t / s
    a = max(a, 0.0)
    return a / (2 * (n - 1)), 2 * (n - 1) / (n * b)


@dataclass(frozen=True)
class JobProfile:
    run_id: str
    np: int
    batch_size: int
    compute_s: float  # per step, per rank, comm wait excluded
    data_s: float
    grad_bytes: float
    controller: str

    @property
    def local_s(self) -> float:
        return self.compute_s + self.data_s


@dataclass(frozen=True)
class Prediction:
    network: str
    bandwidth: float  # B, bytes/s
    np: int
    ranks_per_host: int
    local_s: float  # after the cores factor
    comm_s: float
    step_s: float
    efficiency: float
    samples_per_sec: float


def predict(profile: JobProfile, n: int, network: str, bandwidth: float, alpha: float, *, cores: int,
            ranks_per_host: int, alpha_share: float = 1.0) -> Prediction:
    """``alpha_share``: the share of a core each probe rank had (``min(1, cores / probe ranks)`` on
    the probe's host); α is CPU time, so a rank with less of a core than the probe's takes longer."""
    rph = min(n, ranks_per_host)
    share = min(1.0, cores / rph)  # of a core, per rank
    local = profile.local_s / share
    comm = ring_allreduce_time(n, profile.grad_bytes, alpha * alpha_share / share, bandwidth)
    step = local + comm
    return Prediction(network, bandwidth, n, rph, local, comm, step, profile.local_s / step, n * profile.batch_size / step)


def parse_networks(spec: str) -> list[str]:
    out = []
    for part in filter(None, (p.strip().lower() for p in str(spec).split(","))):
        if part != LOCAL and part not in NETWORKS:
            raise UsageError(f"--network {spec!r}: unknown network {part!r}",
                             fix=f"use {', '.join([*NETWORKS, LOCAL])}")
        if part not in out:
            out.append(part)
    if not out:
        raise UsageError(f"--network {spec!r} names no network", fix="pass e.g. --network 10gbit,100gbit,local")
    return out


# -- the job and the probe -------------------------------------------------------------------------
def job_profile(client, run_id: str) -> JobProfile:
    """The job's per-step local time and gradient bytes, from its rank runs (``run_id``: the
    job's parent run, or one of its rank runs)."""
    from mlflow.exceptions import MlflowException

    from hvdkit.report import child_runs, warm_mean
    from hvdkit.tracking.context import TAG_CONTROLLER

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise TrackingError(f"unknown run ID {run_id!r}", fix="pass the parent run ID of a tracked hvdkit job") from None
    if run.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK:
        run = client.get_run(run.data.tags[keys.MLFLOW_PARENT_RUN_ID])
    tags = run.data.tags
    if tags.get(keys.TAG_ROLE) != keys.ROLE_PARENT:
        raise TrackingError(f"run {run_id} is not an hvdkit job run ({keys.TAG_ROLE}={tags.get(keys.TAG_ROLE)!r})",
                            fix="pass the parent run ID of a tracked hvdkit job (not a sweep)")
    ranks = child_runs(client, run.info.experiment_id, run.info.run_id, keys.ROLE_RANK)
    compute, data, params = [], [], []
    for r in ranks:
        step = warm_mean(client, r.info.run_id, keys.STEP_TIME_S)
        if step is None:
            continue
        comm = warm_mean(client, r.info.run_id, keys.COMM_WAIT_S) or 0.0
        compute.append(step - comm)
        data.append(warm_mean(client, r.info.run_id, keys.DATA_TIME_S) or 0.0)
        if keys.PARAMETERS in r.data.metrics:
            params.append(r.data.metrics[keys.PARAMETERS])
    if not compute or not params:
        missing = keys.STEP_TIME_S if not compute else keys.PARAMETERS
        raise TrackingError(f"run {run.info.run_id} has no {missing} on its rank runs",
                            fix="plan from a tracked job that trained at least two log intervals, with per-rank runs")
    batch = tags.get(keys.TAG_BATCH_SIZE) or run.data.params.get("recipe.batch_size")
    if not str(batch or "").isdigit():
        raise TrackingError(f"run {run.info.run_id} has no batch size tag", fix="plan from a run hvdkit tracked")
    return JobProfile(run.info.run_id, int(tags.get(keys.TAG_WORLD_SIZE) or len(ranks)), int(batch),
                      sum(compute) / len(compute), sum(data) / len(data),
                      # the largest slice: a split model averages each slice's gradients separately
                      max(params) * BYTES_PER_PARAM, tags.get(TAG_CONTROLLER, "gloo"))


@dataclass(frozen=True)
class Probe:
    np: int
    controller: str
    points: list[tuple[float, float]]  # (bytes, seconds)
    alpha: float
    bandwidth: float  # bus bandwidth B


def run_probe(controller: str, *, budget_s: float = 12.0, timeout_s: float = 180.0,
              echo: Callable[[str], None] = print) -> Probe:
    """The allreduce probe as a horovodrun job, np=2 on this host, with the job's controller."""
    from hvdkit import launch as L

    L.check_framework_built("torch")
    opts = L.LaunchOptions(np=PROBE_NP, controller=controller, track=False)
    with tempfile.TemporaryDirectory(prefix="hvdkit-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, "-m", "hvdkit._horovodrun", "-np", str(PROBE_NP), f"--{controller}",
               sys.executable, "-m", "hvdkit.torch._probe", str(out), "--budget-s", str(budget_s)]
        echo(f"hvdkit: allreduce probe: np={PROBE_NP}, {controller}, 4 KiB..64 MiB")
        try:
            res = subprocess.run(cmd, env=L.worker_env(opts), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"the allreduce probe took over {timeout_s:.0f}s",
                              fix="check `hvdkit doctor` and that nothing else holds this host's cores") from None
        if res.returncode != 0 or not out.exists():
            tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-3:])[:400]
            raise LaunchError(f"the allreduce probe failed (exit {res.returncode}): {tail}",
                              fix=f"run `hvdkit doctor`; the probe needs Horovod's torch layer with {controller}")
        doc = json.loads(out.read_text())
    points = [(float(s), float(t)) for s, t in doc["points"]]
    alpha, bw = fit_ring(points, int(doc["size"]))
    return Probe(int(doc["size"]), controller, points, alpha, bw)


# -- output ----------------------------------------------------------------------------------------
PLAN_COLUMNS = ("network", "bandwidth_Bps", "np", "ranks_per_host", "local_s", "comm_s", "step_s", "efficiency",
                "samples_per_sec")


def _rows(preds: Sequence[Prediction]) -> list[dict]:
    return [{"network": p.network, "bandwidth_Bps": p.bandwidth, "np": p.np, "ranks_per_host": p.ranks_per_host,
             "local_s": p.local_s, "comm_s": p.comm_s, "step_s": p.step_s, "efficiency": p.efficiency,
             "samples_per_sec": p.samples_per_sec} for p in preds]


def _notes(profile: JobProfile, probe: Probe, cores: int, ranks_per_host: int) -> list[str]:
    return [
        f"job run {profile.run_id} (np={profile.np}, batch {profile.batch_size}/rank, {profile.controller}): "
        f"compute {profile.compute_s * 1e3:.3f} ms + data {profile.data_s * 1e3:.3f} ms per step, "
        f"gradients {profile.grad_bytes / 2**20:.3f} MiB (parameters x 4 B)",
        f"probe np={probe.np} {probe.controller}: alpha {probe.alpha * 1e6:.1f} us, bus bandwidth "
        f"{probe.bandwidth / 1e9:.3f} GB/s (busbw = algbw x 2(n-1)/n)",
        "t_comm(N) = 2(N-1)·alpha·k + 2(N-1)/N · bytes/B; t_step = t_local·k + t_comm, k = max(1, ranks_per_host/cores) "
        "(no compute/communication overlap); E(N) = t_step(1)/t_step(N) at a fixed per-rank batch",
        f"cores per host {cores}: 'local' runs all N ranks on this host; named networks {ranks_per_host} rank(s) per host",
    ]


def _figure(preds: Sequence[Prediction]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for net in dict.fromkeys(p.network for p in preds):
        ps = [p for p in preds if p.network == net]
        ax1.plot([p.np for p in ps], [p.efficiency for p in ps], "o-", label=net)
        ax2.plot([p.np for p in ps], [p.step_s * 1e3 for p in ps], "o-", label=net)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (N)")
        ax.legend()
    ax1.axhline(1.0, linestyle="--", color="gray")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("predicted E(N)")
    ax1.set_title("predicted scaling efficiency")
    ax2.set_yscale("log")
    ax2.set_ylabel("predicted step time (ms)")
    ax2.set_title("predicted step time")
    fig.tight_layout()
    return fig


def write(preds: Sequence[Prediction], probe: Probe, notes: Sequence[str], out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(preds)
    with open(out / "plan.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PLAN_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(out / "probe.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("bytes", "seconds", "algbw_Bps", "busbw_Bps", "fit_seconds"))
        for s, t in probe.points:
            w.writerow((int(s), t, algorithm_bandwidth(s, t), bus_bandwidth(s, t, probe.np),
                        ring_allreduce_time(probe.np, s, probe.alpha, probe.bandwidth)))
    md = ["# hvdkit plan", "", *[f"- {n}" for n in notes], "",
          "| network | N | ranks/host | local ms | comm ms | step ms | E(N) | samples/s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {p.network} | {p.np} | {p.ranks_per_host} | {p.local_s * 1e3:.3f} | {p.comm_s * 1e3:.3f} | "
           f"{p.step_s * 1e3:.3f} | {p.efficiency:.3f} | {p.samples_per_sec:,.0f} |" for p in preds]
    (out / "plan.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    _figure(preds).savefig(out / "plan.png", dpi=100)


def print_table(preds: Sequence[Prediction], title: str, notes: Sequence[str], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("network", "N", "ranks/host", "local ms", "comm ms", "step ms", "E(N)", "samples/s"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for p in preds:
        table.add_row(p.network, str(p.np), str(p.ranks_per_host), f"{p.local_s * 1e3:.3f}", f"{p.comm_s * 1e3:.3f}",
                      f"{p.step_s * 1e3:.3f}", f"{p.efficiency:.3f}", f"{p.samples_per_sec:,.0f}")
    console = Console(file=file or sys.stdout, width=120)
    console.print(table)
    for n in notes:
        console.print(f"  {n}", highlight=False, soft_wrap=True)  # one line each: greppable


def make_plan(client, run_id: str, networks: Sequence[str], nps: Sequence[int], *, cores: int | None = None,
              ranks_per_host: int = 1, probe: Probe | None = None, log: bool = True,
              echo: Callable[[str], None] = print) -> tuple[JobProfile, Probe, list[Prediction], list[str]]:
    """Profile the job, probe (unless handed one), predict each network x N, log ``plan/`` on the run."""
    if ranks_per_host < 1:
        raise UsageError(f"--ranks-per-host {ranks_per_host} < 1", fix="pass 1 or more")
    cores = cores or os.cpu_count() or 1
    if cores < 1:
        raise UsageError(f"--cores {cores} < 1", fix="pass 1 or more")
    profile = job_profile(client, run_id)
    probe = probe or run_probe(profile.controller, echo=echo)
    preds = []
    for net in networks:
        bw = probe.bandwidth if net == LOCAL else NETWORKS[net]
        for n in nps:
            rph = n if net == LOCAL else ranks_per_host
            preds.append(predict(profile, n, net, bw, probe.alpha, cores=cores, ranks_per_host=rph,
                                 alpha_share=min(1.0, (os.cpu_count() or 1) / probe.np)))
    notes = _notes(profile, probe, cores, ranks_per_host)
    if log:
        with tempfile.TemporaryDirectory(prefix="hvdkit-plan-") as tmp:
            write(preds, probe, notes, tmp)
            client.log_artifacts(profile.run_id, tmp, ARTIFACT_DIR)
    return profile, probe, preds, notes


__all__ = ["NETWORKS", "JobProfile", "Prediction", "Probe", "bus_bandwidth", "fit_ring", "job_profile", "make_plan",
           "parse_networks", "predict", "print_table", "ring_allreduce_time", "run_probe", "write"]
