"""``hvdkit scale``: a sweep over rank counts with scaling efficiency.

Each job is launched by :func:`hvdkit.launch.job.launch_job`, like ``hvdkit run``'s.
:func:`run_sweep` runs the same recipe at each N of a list, nests every job under one *sweep*
  run (``hvdkit.role=sweep``), reads each job's measured throughput T(N) back from the store and
  logs ``scaling_efficiency`` E(N) = T(N) / (N * T(1)) on the sweep run (step = N) and on each job.
The scalability report (:mod:`hvdkit.report`) is attached to the sweep run under ``report/``.

Framework-free, like the tracking layer: the jobs import the frameworks, this process never does.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hvdkit._ids import experiment_name, new_job_id
from hvdkit.errors import LaunchError, TrackingError, UsageError
from hvdkit.core.job import JobFolder
from hvdkit.launch.job import launch_job
from hvdkit.tracking import keys
from hvdkit.tracking._resume import job_runs

TAG_SWEEP_NP = "hvdkit.sweep_np"  # the sweep's rank counts, e.g. "1,2,4" (sweep run)


# -- the sweep -------------------------------------------------------------------------------
def parse_np_list(spec: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, unique)."""
    out = set()
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--np {spec!r}: {part!r} is not a rank count >= 1", fix="pass rank counts like --np 1,2,4")
        out.add(int(part))
    if not out:
        raise UsageError(f"--np {spec!r} names no rank count", fix="pass rank counts like --np 1,2,4")
    return sorted(out)


@dataclass
class SweepRow:
    np: int
    samples_per_sec: float | None = None  # T(N), from the job's parent run in the store
    efficiency: float | None = None  # E(N)
    run_id: str | None = None  # the job's parent run
    status: str = "FINISHED"

    def as_dict(self) -> dict[str, Any]:
        return {"np": self.np, "samples_per_sec": self.samples_per_sec, "efficiency": self.efficiency, "run_id": self.run_id}


@dataclass
class SweepResult:
    sweep_run_id: str
    experiment_id: str
    status: str  # FINISHED, FAILED or KILLED
    rows: list[SweepRow] = field(default_factory=list)
    baseline_run_id: str | None = None
    message: str = ""


class _Interrupted(BaseException):
    """SIGTERM to ``hvdkit scale`` between jobs: unwinds so the sweep run ends KILLED."""


def _job_parent(client, experiment: str, job_id: str):
    for run in job_runs(client, experiment, job_id):
        if run.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT:
            return run
    return None


def _baseline_for_job(client, experiment_id: str, recipe, found, parent):
    """The np=1 run of the first job's host type: ``found`` if it is one, else the latest such run."""
    from hvdkit.tracking.efficiency import find_baseline

    job_htype = parent.data.tags.get(keys.TAG_HOST_TYPE)
    if found is not None and client.get_run(found.run_id).data.tags.get(keys.TAG_HOST_TYPE) == job_htype:
        return found
    if not job_htype:
        return None
    return find_baseline(client, experiment_id, recipe.name, recipe.framework, recipe.batch_size, job_htype)


def _last_step(client, run_id: str) -> int:
    hist = client.get_metric_history(run_id, keys.SAMPLES_PER_SEC)
    return max((m.step for m in hist), default=0)


def print_table(rows: Sequence[SweepRow], title: str, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("np", "samples/s (T)", "efficiency (E)", "job run", "status"):
        table.add_column(col, justify="right" if col != "job run" else "left")
    for r in rows:
        table.add_row(
            str(r.np),
            "-" if r.samples_per_sec is None else f"{r.samples_per_sec:,.1f}",
            "-" if r.efficiency is None else f"{r.efficiency:.3f}",
            r.run_id or "-",
            r.status,
        )
    Console(file=file or sys.stdout, width=120).print(table)


def run_sweep(loaded, opts, nps: Sequence[int], overrides: Sequence[str], *, log_every: int | None = None,
              experiment: str | None = None, tracking_uri: str | None = None, baseline: str | None = None,
              echo: Callable[[str], None] = print) -> SweepResult:
    """Run ``loaded`` at each N of ``nps`` (``opts`` as for ``hvdkit run``; its ``np`` is ignored)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from hvdkit import launch as L
    from hvdkit.tracking._uri import absolute_uri, resolve_tracking_uri
    from hvdkit.tracking.efficiency import (
        Baseline,
        find_baseline,
        host_type,
        run_throughput,
        scaling_efficiency,
    )

    nps = sorted(set(nps))
    recipe = loaded.recipe
    # Every check before anything is created: slots for the largest N, framework built in, hosts
    # reachable (as hvdkit run checks them).
    host_slots = L.resolve_hosts(replace(opts, np=max(nps)))
    L.check_framework_built(recipe.framework)
    L.check_ssh(host_slots, opts)
    from hvdkit.core._layout import check_recipe_layout
    from hvdkit.recipe._python import model_kind

    for n in nps:  # parallel.model must divide every N of the sweep: one line, exit 2, nothing started
        check_recipe_layout(recipe, n, elastic=False, **model_kind(loaded.python))
    # One store and one experiment for the sweep and every job: the jobs get both explicitly, so
    # neither the workers' cwd nor their environment can send a job elsewhere (a job nested under
    # a run of another experiment would not show under it in the UI).
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    exp_name = experiment_name(experiment)
    client = MlflowClient(tracking_uri=uri)
    # This host, without an accelerator: the launcher imports no framework. The jobs tag the host
    # type with the device they train on, and the baseline must be of that type (checked after the
    # first job when the sweep has no np=1 job of its own).
    htype = host_type()
    try:
        exp = client.get_experiment_by_name(exp_name)
        base: Baseline | None = None
        if 1 in nps:
            if baseline:
                raise UsageError(f"--baseline {baseline} with 1 in --np {','.join(map(str, nps))}: the sweep's own "
                                 "np=1 job is its baseline", fix="drop --baseline, or drop 1 from --np")
        else:
            if baseline or exp is not None:
                base = find_baseline(client, exp.experiment_id if exp else "", recipe.name, recipe.framework,
                                     recipe.batch_size, htype, run_id=baseline, any_accelerator=True)
            if base is None:
                raise LaunchError(
                    f"--np {','.join(map(str, nps))} has no 1 and experiment {exp_name!r} holds no finished np=1 run of "
                    f"recipe {recipe.name!r} ({recipe.framework}, batch {recipe.batch_size}, this host type)",
                    fix="add 1 to --np, or pass --baseline RUN_ID",
                )
        # Checks passed: only now is anything created.
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
        tags = {
            keys.TAG_ROLE: keys.ROLE_SWEEP,
            keys.TAG_RECIPE: recipe.name,
            keys.TAG_FRAMEWORK: recipe.framework,
            keys.TAG_BATCH_SIZE: str(recipe.batch_size),
            keys.TAG_HOST_TYPE: htype,
            TAG_SWEEP_NP: ",".join(map(str, nps)),
        }
        if base is not None:
            tags[keys.TAG_BASELINE_RUN_ID] = base.run_id
        run_name = f"{recipe.name}-{recipe.framework}-sweep-np{'-'.join(map(str, nps))}"
        sweep = client.create_run(exp_id, run_name=run_name, tags=tags)
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {uri}: {exc.message}",
                            fix="a sweep reads each job's throughput back from the store: make it reachable") from None
    sweep_id = sweep.info.run_id
    result = SweepResult(sweep_run_id=sweep_id, experiment_id=exp_id, status="FAILED",
                         baseline_run_id=base.run_id if base else None)
    from mlflow.entities import Metric, Param

    client.log_batch(sweep_id, params=[Param("np", ",".join(map(str, nps))), Param("recipe", recipe.name),
                                       Param("framework", recipe.framework), Param("batch_size", str(recipe.batch_size)),
                                       Param("overrides", " ".join(overrides)[:6000] or "-")])
    if base is not None:  # the baseline is the sweep's N=1 point: plotted, and E(1) = 1 by definition
        result.rows.append(SweepRow(1, base.samples_per_sec, 1.0, base.run_id, "baseline"))
    echo(f"hvdkit: sweep {sweep_id} in experiment {exp_name!r} ({exp_id}): np {', '.join(map(str, nps))}")

    def on_term(signum, _frame):
        raise _Interrupted(signal.Signals(signum).name)

    old_term = signal.signal(signal.SIGTERM, on_term)
    # A baseline found in the store before any job ran matched this host with any accelerator;
    # the first job's own host type decides (a CPU np=1 run is no baseline for a GPU job).
    # --baseline RUN_ID is the user's choice and is kept.
    base_settled = 1 in nps or bool(baseline)
    try:
        for n in nps:
            job_opts = replace(opts, np=n, env={**opts.env, "MLFLOW_TRACKING_URI": uri})
            args = ["--experiment", exp_name, "--parent-run-id", sweep_id]
            if log_every:
                args += ["--log-every", str(log_every)]
            if n > 1 and base is not None and base_settled:
                args += ["--baseline", base.run_id]  # the job logs E(N) on its own run too
            cmd = L.horovodrun_command(loaded, job_opts, args, list(overrides))
            job_id = new_job_id()
            echo(f"hvdkit: sweep np={n}: job {job_id}")
            t0 = time.perf_counter()
            out = launch_job(cmd, L.worker_env(job_opts), experiment=exp_name, tracking_uri=uri,
                             job=JobFolder.for_recipe(recipe.checkpoint.dir, job_id))
            row = SweepRow(n, status=out.status)
            result.rows.append(row)
            if out.status != "FINISHED":
                result.status = out.status
                result.message = f"job np={n} {out.status} (launcher exit code {out.rc})"
                break
            parent = _job_parent(client, exp_name, out.job_id)
            row.run_id = parent.info.run_id if parent is not None else None
            t_n = run_throughput(client, row.run_id) if row.run_id else None
            if not t_n:
                row.status = "FAILED"
                result.message = (f"job np={n} left no {keys.SAMPLES_PER_SEC} in {uri} "
                                  "(store unreachable during the job? see its spool and `hvdkit sync`)")
                break
            row.samples_per_sec = t_n
            if not base_settled:
                base = _baseline_for_job(client, exp_id, recipe, base, parent)
                if base is None:
                    row.status = "FAILED"
                    result.message = (f"experiment {exp_name!r} holds no finished np=1 run of recipe {recipe.name!r} "
                                      f"on host type {parent.data.tags.get(keys.TAG_HOST_TYPE)!r} (this sweep's jobs); "
                                      "fix: add 1 to --np, or pass --baseline RUN_ID")
                    break
                client.set_tag(sweep_id, keys.TAG_BASELINE_RUN_ID, base.run_id)
                client.set_tag(sweep_id, keys.TAG_HOST_TYPE, parent.data.tags.get(keys.TAG_HOST_TYPE, htype))
                result.baseline_run_id = base.run_id
                if result.rows and result.rows[0].status == "baseline":
                    result.rows[0] = SweepRow(1, base.samples_per_sec, 1.0, base.run_id, "baseline")
                base_settled = True
            if n == 1:
                base = Baseline(row.run_id, t_n, recipe.name)
                client.set_tag(sweep_id, keys.TAG_BASELINE_RUN_ID, base.run_id)
            assert base is not None
            row.efficiency = scaling_efficiency(t_n, n, base.samples_per_sec)
            now = int(time.time() * 1000)
            client.log_batch(sweep_id, metrics=[Metric(keys.SAMPLES_PER_SEC, t_n, now, n),
                                                Metric(keys.SCALING_EFFICIENCY, row.efficiency, now, n)])
            if keys.SCALING_EFFICIENCY not in parent.data.metrics:
                # np=1 jobs (and jobs whose own lookup failed) have none: log the sweep's value.
                client.log_metric(row.run_id, keys.SCALING_EFFICIENCY, row.efficiency, now, _last_step(client, row.run_id))
            echo(f"hvdkit: sweep np={n}: T={t_n:,.1f} samples/s, E={row.efficiency:.3f} "
                 f"({time.perf_counter() - t0:.1f}s, run {row.run_id})")
        else:
            result.status = "FINISHED"
    except (KeyboardInterrupt, _Interrupted):
        result.status, result.message = "KILLED", "interrupted"
    finally:
        signal.signal(signal.SIGTERM, old_term)
        try:
            if any(r.samples_per_sec is not None for r in result.rows):
                # The report reads the jobs back from the store, as `hvdkit report` does later: one
                # code path, so a rebuilt report equals the one the sweep attached.
                from hvdkit.report import build as build_report

                try:
                    build_report(client, sweep_id)
                except Exception as exc:  # noqa: BLE001 - the sweep's result outranks its report
                    echo(f"hvdkit: warning: the sweep's report was not attached ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}) — fix: hvdkit report {sweep_id}")
        finally:
            client.set_terminated(sweep_id, result.status)
    return result


__all__ = [
    "SweepResult",
    "SweepRow",
    "parse_np_list",
    "print_table",
    "run_sweep",
]
