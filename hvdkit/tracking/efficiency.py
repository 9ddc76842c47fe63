"""Scaling efficiency: how much of N times the np=1 throughput a job reached.

``E = T_N / (N * T_1)`` with T a parent run's ``samples_per_sec``. T_1 comes from a baseline:
the latest finished np=1 job with the same recipe, framework, per-rank batch size and host
type (anything else and the ratio measures the difference, not the scaling).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvdkit.errors import TrackingError, UsageError
from hvdkit.tracking import keys

if TYPE_CHECKING:  # MLflow is imported where a store is read: every rank computes its job's throughput
    from mlflow import MlflowClient


def scaling_efficiency(t_n: float, n: int, t_1: float) -> float:
    """``t_n / (n * t_1)``: 1.0 is perfect linear scaling."""
    if n < 1 or not t_1 > 0:
        raise UsageError(f"scaling efficiency needs n >= 1 and t_1 > 0 (got n={n}, t_1={t_1})", fix="check the baseline run")
    return t_n / (n * t_1)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def host_type(accelerator: str | None = None) -> str:
    """A stable name for the kind of machine, e.g. ``x86_64-16cpu-amd-epyc-7b13``.

    ``accelerator`` (e.g. ``torch.cuda.get_device_name()``, passed in by a framework layer so
    this module imports none) is appended: an np=1 CPU run is no baseline for a GPU job.
    """
    parts = [platform.machine() or "unknown", f"{os.cpu_count() or 0}cpu", _slug(_cpu_model())[:60]]
    if accelerator:
        parts.append(_slug(accelerator)[:60])
    return "-".join(p for p in parts if p)


def history_throughput(values: Iterable[float]) -> float | None:
    """Mean samples_per_sec of a history (in step order), without the first (warm-up) interval
    when there are at least two points; None when empty."""
    h = [v for v in values if math.isfinite(v)]
    if not h:
        return None
    if len(h) >= 2:
        h = h[1:]
    return math.fsum(h) / len(h)


# The same warm mean for any per-interval metric (step, data, communication times, straggler ratio):
# the first interval holds start-up work (allocations, the first collectives' connection set-up).
history_mean = history_throughput


def run_throughput(client: MlflowClient, run_id: str) -> float | None:
    """T of a parent run, from its ``samples_per_sec`` history."""
    hist = sorted(client.get_metric_history(run_id, keys.SAMPLES_PER_SEC), key=lambda m: (m.step, m.timestamp))
    return history_throughput(m.value for m in hist)


@dataclass(frozen=True)
class Baseline:
    run_id: str
    samples_per_sec: float  # T_1
    recipe: str


def find_baseline(
    client: MlflowClient,
    experiment_id: str,
    recipe: str,
    framework: str,
    batch_size: int | str,
    host_type: str,
    run_id: str | None = None,
    any_accelerator: bool = False,
) -> Baseline | None:
    """The np=1 run to divide by: ``run_id`` if given (it must exist and be of ``recipe``), else
    the latest FINISHED parent run of ``experiment_id`` with world size 1 and the same recipe,
    framework, batch size and host type. None when there is none (the caller says so and logs
    no efficiency). ``any_accelerator``: ``host_type`` is this host without an accelerator (a
    launcher, which imports no framework) and a run of this host with any accelerator matches too."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            # Only "no such run" means the ID is wrong; a store that is down is not the user's typo.
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            raise TrackingError(
                f"unknown --baseline run ID {run_id!r}", fix="pass the run ID of an np=1 hvdkit job (its parent run)"
            ) from None
        got = run.data.tags.get(keys.TAG_RECIPE)
        if got != recipe:
            raise TrackingError(
                f"--baseline run {run_id} is of recipe {got!r}, this job runs recipe {recipe!r}",
                fix="pass a baseline run of the same recipe",
            )
        t1 = run_throughput(client, run_id)
        if t1 is None or not t1 > 0:
            raise TrackingError(
                f"--baseline run {run_id} has no {keys.SAMPLES_PER_SEC} history",
                fix="pass the parent run of an hvdkit job that trained at least one interval",
            )
        return Baseline(run_id, t1, recipe)

    want = {
        keys.TAG_RECIPE: recipe,
        keys.TAG_FRAMEWORK: framework,
        keys.TAG_BATCH_SIZE: str(batch_size),
    }

    def same_host(tags: Mapping[str, str]) -> bool:
        got = tags.get(keys.TAG_HOST_TYPE) or ""
        return got == host_type or (any_accelerator and got.startswith(host_type + "-"))

    # Constant parts filter in the store; the user-supplied strings are compared here, so no
    # quoting of recipe names into MLflow's filter language is needed.
    flt = (
        f"tags.`{keys.TAG_ROLE}` = '{keys.ROLE_PARENT}' and tags.`{keys.TAG_WORLD_SIZE}` = '1' "
        "and attributes.status = 'FINISHED'"
    )
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=200, page_token=token
        )
        for run in page:
            tags = run.data.tags
            if all(tags.get(k) == v for k, v in want.items()) and same_host(tags):
                t1 = run_throughput(client, run.info.run_id)
                if t1 is not None and t1 > 0:
                    return Baseline(run.info.run_id, t1, recipe)
        token = page.token
        if not token:
            return None


def write_sweep_artifacts(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``scaling.png`` (throughput and efficiency vs N, with the ideal line) and ``scaling.csv``
    (np, samples_per_sec, efficiency, run_id) in ``out_dir``. ``rows`` need ``np`` and
    ``samples_per_sec``; ``efficiency`` and ``run_id`` may be missing/None."""
    table = sorted(
        (
            {
                "np": int(r["np"]),
                "samples_per_sec": float(r["samples_per_sec"]),
                "efficiency": None if r.get("efficiency") is None else float(r["efficiency"]),
                "run_id": r.get("run_id") or "",
            }
            for r in rows
        ),
        key=lambda r: r["np"],
    )
    if not table:
        raise UsageError("no sweep results to plot", fix="run at least one job of the sweep")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "scaling.csv", out / "scaling.png"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["np", "samples_per_sec", "efficiency", "run_id"])
        w.writeheader()
        for r in table:
            w.writerow({**r, "efficiency": "" if r["efficiency"] is None else r["efficiency"]})

    scaling_figure(table).savefig(png_path, dpi=100)
    return png_path, csv_path


def scaling_figure(table: Iterable[Mapping[str, Any]]):
    """Throughput against N with the ideal N x T_1 line, and E(N) against 1 (a matplotlib Figure,
    Agg). ``table`` rows: ``np``, ``samples_per_sec``, ``efficiency`` (None: not plotted)."""
    # A bare Figure renders with Agg and never touches pyplot's global backend: no display is
    # needed on a cluster node, and a caller's interactive backend is left alone.
    from matplotlib.figure import Figure

    table = sorted(table, key=lambda r: r["np"])
    ns = [r["np"] for r in table]
    tput = [r["samples_per_sec"] for r in table]
    base = next((r for r in table if r["np"] == 1), None)
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ns, tput, "o-", label="measured")
    if base is not None:
        ax1.plot(ns, [base["samples_per_sec"] * n for n in ns], "--", color="gray", label="ideal (N x T_1)")
    ax1.set_xlabel("ranks (N)")
    ax1.set_ylabel("samples/s")
    ax1.set_title("throughput")
    ax1.legend()
    eff = [(r["np"], r["efficiency"]) for r in table if r["efficiency"] is not None]
    if eff:
        ax2.plot([n for n, _ in eff], [e for _, e in eff], "o-", label="measured")
    ax2.axhline(1.0, linestyle="--", color="gray", label="ideal")
    ax2.set_xlabel("ranks (N)")
    ax2.set_ylabel("T_N / (N T_1)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("scaling efficiency")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(ns)
    fig.tight_layout()
    return fig
