"""The scalability report of a sweep: ``hvdkit scale`` writes it, ``hvdkit report`` rebuilds it.

Everything comes from stored runs only: the sweep run, every job run nested under it (a job added
later with ``--parent-run-id`` counts too) and each job's rank runs. Written under the sweep run's
artifact folder ``report/``:

- ``scaling.csv``: one row per job: T(N), speedup T(N)/T(1), E(N), the per-step breakdown, the
  straggler ratio.
- ``ranks.csv``: the breakdown per rank of each job.
- ``scaling.png``, ``breakdown.png``, ``straggler.png`` and ``report.html`` (one page, a table and
  the images by relative path, so it opens from MLflow's artifact view).

Per-step decomposition (``core/loop.py``, the backends): a rank's ``step_time_s`` is the whole
``train_step`` call, and ``comm_wait_s`` (time blocked in the gradient allreduce's synchronize)
is inside it; ``data_time_s`` (waiting for the next batch) is outside it. So a step costs
``compute = step_time_s - comm_wait_s``, ``data = data_time_s`` and ``comm = comm_wait_s``, and
their sum is the wall time of a step. Every value is a warm mean (first interval dropped, as for T).

Framework-free, like ``hvdkit.scale``.
"""

from __future__ import annotations

import csv
import html
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvdkit.errors import TrackingError
from hvdkit.tracking import keys

ARTIFACT_DIR = "report"


@dataclass
class RankPoint:
    rank: int
    run_id: str
    compute_s: float | None
    data_time_s: float | None
    comm_wait_s: float | None


@dataclass
class JobPoint:
    np: int
    run_id: str
    status: str
    samples_per_sec: float | None = None  # T(N)
    speedup: float | None = None  # T(N) / T(1)
    efficiency: float | None = None  # E(N) = T(N) / (N T(1))
    step_time_s: float | None = None  # mean over ranks; includes comm_wait_s
    compute_s: float | None = None
    data_time_s: float | None = None
    comm_wait_s: float | None = None
    straggler_ratio: float | None = None
    ranks: list[RankPoint] = field(default_factory=list)
    baseline: bool = False  # the np=1 baseline run, taken from outside the sweep


@dataclass
class SweepReport:
    sweep_run_id: str
    title: str
    jobs: list[JobPoint]
    baseline_run_id: str | None


CSV_COLUMNS = ("np", "samples_per_sec", "speedup", "efficiency", "step_time_s", "compute_s", "data_time_s",
               "comm_wait_s", "straggler_ratio", "run_id", "status")


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def warm_mean(client, run_id: str, key: str) -> float | None:
    from hvdkit.tracking.efficiency import history_mean

    hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return history_mean(m.value for m in hist)


def child_runs(client, experiment_id: str, parent_id: str, role: str) -> list:
    flt = f"tags.`{keys.MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`{keys.TAG_ROLE}` = '{role}'"
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _job_point(client, run, baseline: bool = False) -> JobPoint:
    from hvdkit.tracking.efficiency import run_throughput

    rid = run.info.run_id
    n = int(run.data.tags.get(keys.TAG_WORLD_SIZE) or run.data.metrics.get(keys.WORLD_SIZE) or 0)
    job = JobPoint(n, rid, run.info.status, samples_per_sec=run_throughput(client, rid), baseline=baseline)
    job.straggler_ratio = warm_mean(client, rid, keys.STRAGGLER_RATIO)
    steps = []
    for child in child_runs(client, run.info.experiment_id, rid, keys.ROLE_RANK):
        tags = child.data.tags
        step, data, comm = (warm_mean(client, child.info.run_id, k) for k in (keys.STEP_TIME_S, keys.DATA_TIME_S, keys.COMM_WAIT_S))
        rank = int(tags.get(keys.TAG_RANK, -1)) if str(tags.get(keys.TAG_RANK, "")).isdigit() else -1
        compute = None if step is None else step - (comm or 0.0)
        job.ranks.append(RankPoint(rank, child.info.run_id, compute, data, comm))
        steps.append(step)
    job.ranks.sort(key=lambda r: r.rank)
    job.step_time_s = _mean(steps)
    job.compute_s = _mean(r.compute_s for r in job.ranks)
    job.data_time_s = _mean(r.data_time_s for r in job.ranks)
    job.comm_wait_s = _mean(r.comm_wait_s for r in job.ranks)
    return job


def collect(client, sweep_run_id: str) -> SweepReport:
    """The report's numbers, read from the store: the sweep run, its nested jobs, their rank runs."""
    from mlflow.exceptions import MlflowException

    try:
        sweep = client.get_run(sweep_run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise TrackingError(f"unknown sweep run ID {sweep_run_id!r}",
                            fix="pass the run ID `hvdkit scale` printed (hvdkit: sweep <id> ...)") from None
    tags = sweep.data.tags
    if tags.get(keys.TAG_ROLE) != keys.ROLE_SWEEP:
        raise TrackingError(f"run {sweep_run_id} is not a sweep run (its {keys.TAG_ROLE} is {tags.get(keys.TAG_ROLE)!r})",
                            fix="pass the sweep run of `hvdkit scale`, not one of its jobs")
    jobs = [_job_point(client, r) for r in child_runs(client, sweep.info.experiment_id, sweep_run_id, keys.ROLE_PARENT)]
    base_id = tags.get(keys.TAG_BASELINE_RUN_ID)
    if base_id and not any(j.run_id == base_id for j in jobs):
        try:  # a sweep without np=1 divides by a stored run outside it: show it as the N=1 point
            jobs.append(_job_point(client, client.get_run(base_id), baseline=True))
        except MlflowException:
            pass
    base = next((j for j in jobs if j.run_id == base_id), None) or next((j for j in jobs if j.np == 1), None)
    t1 = base.samples_per_sec if base is not None else None
    for j in jobs:
        if j.samples_per_sec is not None and t1:
            # Same formula and inputs as hvdkit.scale logs, so the CSV equals the stored metric.
            from hvdkit.tracking.efficiency import scaling_efficiency

            j.speedup = j.samples_per_sec / t1
            j.efficiency = scaling_efficiency(j.samples_per_sec, j.np, t1)
    jobs.sort(key=lambda j: (j.np, j.run_id))
    title = (f"{tags.get(keys.TAG_RECIPE, '?')} · {tags.get(keys.TAG_FRAMEWORK, '?')} · batch "
             f"{tags.get(keys.TAG_BATCH_SIZE, '?')}/rank · {tags.get(keys.TAG_HOST_TYPE, '')}")
    return SweepReport(sweep_run_id, title, jobs, base.run_id if base else None)


# -- writing -------------------------------------------------------------------------------------
def _cell(v) -> str:
    return "" if v is None else str(v)


def _write_csvs(rep: SweepReport, out: Path) -> None:
    with open(out / "scaling.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for j in rep.jobs:
            row = asdict(j)
            row["status"] = "baseline" if j.baseline else j.status
            w.writerow([_cell(row[c]) for c in CSV_COLUMNS])
    with open(out / "ranks.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("np", "rank", "compute_s", "data_time_s", "comm_wait_s", "job_run_id", "run_id"))
        for j in rep.jobs:
            for r in j.ranks:
                w.writerow([j.np, r.rank, _cell(r.compute_s), _cell(r.data_time_s), _cell(r.comm_wait_s), j.run_id, r.run_id])


def _breakdown_figure(rep: SweepReport):
    from matplotlib.figure import Figure

    bars = [(f"N={j.np}\nr{r.rank}", r) for j in rep.jobs for r in j.ranks]
    fig = Figure(figsize=(max(6.0, 0.5 * len(bars) + 2), 4))
    ax = fig.subplots()
    x = list(range(len(bars)))
    bottom = [0.0] * len(bars)
    for attr, label, color in (("compute_s", "compute", "tab:blue"), ("data_time_s", "data wait", "tab:orange"),
                               ("comm_wait_s", "communication wait", "tab:red")):
        ms = [1e3 * (getattr(r, attr) or 0.0) for _, r in bars]
        ax.bar(x, ms, bottom=bottom, label=label, color=color)
        bottom = [b + m for b, m in zip(bottom, ms)]
    ax.set_xticks(x, [name for name, _ in bars], fontsize=7)
    ax.set_ylabel("ms per step")
    ax.set_title("per-rank step time: compute + data wait + communication wait")
    ax.legend()
    fig.tight_layout()
    return fig


def _straggler_figure(rep: SweepReport):
    from matplotlib.figure import Figure

    pts = [(j.np, j.straggler_ratio) for j in rep.jobs if j.straggler_ratio is not None]
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    if pts:
        ax.plot([n for n, _ in pts], [s for _, s in pts], "o-", label="measured")
        ax.set_xticks(sorted({n for n, _ in pts}))
    ax.axhline(1.0, linestyle="--", color="gray", label="no straggler")
    ax.set_xlabel("ranks (N)")
    ax.set_ylabel("max / median step time")
    ax.set_title("straggler ratio")
    ax.legend()
    fig.tight_layout()
    return fig


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _html(rep: SweepReport) -> str:
    e = html.escape
    head = ("N", "samples/s T(N)", "speedup", "linear", "E(N)", "step ms", "compute ms", "data ms", "comm ms",
            "straggler", "job run")
    rows = []
    for j in rep.jobs:
        ms = [_fmt(None if v is None else 1e3 * v, ".2f") for v in (j.step_time_s, j.compute_s, j.data_time_s, j.comm_wait_s)]
        cells = [str(j.np), _fmt(j.samples_per_sec, ",.1f"), _fmt(j.speedup, ".2f"), str(j.np), _fmt(j.efficiency, ".3f"),
                 *ms, _fmt(j.straggler_ratio, ".3f"), e(j.run_id) + (" (baseline)" if j.baseline else "")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hvdkit scaling report {e(rep.sweep_run_id)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body>
<h1>Scaling report</h1>
<p>{e(rep.title)}<br>sweep run <code>{e(rep.sweep_run_id)}</code>; baseline (N=1) run
<code>{e(rep.baseline_run_id or '-')}</code></p>
<table id="scaling"><thead><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p>T(N): the job's samples/s (all ranks, warm mean); speedup T(N)/T(1) against linear N; E(N) = T(N)/(N&middot;T(1)).
Step time per rank = compute + communication wait (the gradient allreduce, inside the step) and data wait
(before the step); straggler ratio: max/median of the ranks' step time. Means over ranks and intervals,
the first interval dropped.</p>
<h2>Throughput and efficiency</h2><img src="scaling.png" alt="throughput and scaling efficiency">
<h2>Per-rank step time</h2><img src="breakdown.png" alt="per-rank step time breakdown">
<h2>Stragglers</h2><img src="straggler.png" alt="straggler ratio">
<p>Data: <a href="scaling.csv">scaling.csv</a>, <a href="ranks.csv">ranks.csv</a></p>
</body></html>
"""


def write(rep: SweepReport, out_dir: str | os.PathLike[str]) -> Path:
    """Every file of the report in ``out_dir``; returns the HTML page's path."""
    from hvdkit._files import atomic_write
    from hvdkit.tracking.efficiency import scaling_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csvs(rep, out)
    measured = [{"np": j.np, "samples_per_sec": j.samples_per_sec, "efficiency": j.efficiency}
                for j in rep.jobs if j.samples_per_sec is not None]
    scaling_figure(measured).savefig(out / "scaling.png", dpi=100)  # empty axes when no job measured yet
    _breakdown_figure(rep).savefig(out / "breakdown.png", dpi=100)
    _straggler_figure(rep).savefig(out / "straggler.png", dpi=100)
    page = out / "report.html"
    text = _html(rep)
    atomic_write(page, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return page


def build(client, sweep_run_id: str, out_dir: str | os.PathLike[str] | None = None, *, log: bool = True,
          echo: Callable[[str], None] = print) -> SweepReport:
    """Collect, write and, with ``log``, attach the report to the sweep run under ``report/``
    (replacing an earlier one's files of the same names); ``out_dir`` also keeps a copy."""
    import shutil

    rep = collect(client, sweep_run_id)
    # Written to a folder of its own: only the report's files are uploaded, whatever --out holds.
    with tempfile.TemporaryDirectory(prefix="hvdkit-report-") as tmp:
        write(rep, tmp)
        if log:
            client.log_artifacts(rep.sweep_run_id, tmp, ARTIFACT_DIR)
        if out_dir is not None:
            shutil.copytree(tmp, out_dir, dirs_exist_ok=True)
            echo(f"hvdkit: report written to {Path(out_dir) / 'report.html'}")
    return rep


__all__ = ["ARTIFACT_DIR", "CSV_COLUMNS", "JobPoint", "RankPoint", "SweepReport", "build", "child_runs", "collect", "warm_mean", "write"]
