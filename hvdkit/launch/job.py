"""One tracked job: run the launcher's command under a job id and settle how the job ended.

Only the launcher knows how a job ended: when one rank raises, horovodrun (or srun) SIGTERMs the
others, so rank 0 records KILLED although the job FAILED; and a rank SIGKILLed after the grace
period records nothing at all and leaves its runs RUNNING. :func:`launch_job` runs the command
with the job id in ``$HVDKIT_JOB_ID`` (rank 0 adopts it) and, when the job did not succeed, gives
its runs and its folder's manifest the status it observed. ``hvdkit run`` and ``hvdkit scale``
both launch through it. Framework-free: the ranks import the frameworks, this process never does.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hvdkit._ids import experiment_name, new_job_id
from hvdkit.core.job import JobFolder
from hvdkit.errors import TrackingError
from hvdkit.launch import run_forwarding
from hvdkit.tracking import keys
from hvdkit.tracking._resume import job_runs

# How long the launcher waits on the store to settle a job's status before giving up (a dead
# store must not keep a finished job's launcher alive).
SETTLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class JobOutcome:
    rc: int  # the launcher's exit code (horovodrun or srun)
    job_id: str
    signal: int | None = None  # the signal the launcher received (and forwarded), if any
    status: str = "FINISHED"  # how the job ended: FINISHED, FAILED or KILLED
    settled: tuple[str, ...] = ()  # run ids whose status the launcher corrected


_NO_ANSWER = object()


def _bounded(fn: Callable[[], Any], timeout: float, name: str) -> Any:
    """``fn()`` on a daemon thread: its result, the exception it raised, or ``_NO_ANSWER`` when it
    takes longer than ``timeout`` (MLflow's HTTP client retries a dead server for minutes)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the caller, never fatal to the launcher
            box.append(exc)

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else _NO_ANSWER


def check_baseline(run_id: str, recipe_name: str, *, tracking_uri: str | None = None, timeout: float = 15.0) -> None:
    """Before any worker starts: ``--baseline`` must name an np=1 parent run of the same recipe
    with a throughput history (else TrackingError, exit 2, and nothing is created). A store that
    does not answer is not the user's typo: the job starts, and spools."""
    from mlflow import MlflowClient

    from hvdkit.tracking._uri import resolve_tracking_uri
    from hvdkit.tracking.efficiency import find_baseline

    got = _bounded(lambda: find_baseline(MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri)), "",
                                         recipe_name, "", "", "", run_id=run_id), timeout, "hvdkit-baseline")
    if isinstance(got, TrackingError):
        raise got
    if got is _NO_ANSWER or isinstance(got, Exception):
        why = "no answer" if got is _NO_ANSWER else f"{type(got).__name__}: {got}"
        print(f"hvdkit: cannot check --baseline {run_id} now ({why}); the job starts anyway",
              file=sys.stderr, flush=True)


def settle_job_status(job_id: str, status: str, *, experiment: str | None = None, tracking_uri: str | None = None,
                      timeout: float = SETTLE_TIMEOUT_S) -> tuple[str, ...]:
    """Give the runs of job ``job_id`` the status the launcher observed. Only RUNNING runs (rank 0
    never ended them) and, for FAILED, KILLED runs (rank 0 was SIGTERMed because a peer failed)
    change; a run already FAILED or FINISHED keeps what rank 0 recorded. Returns the run ids changed."""
    from mlflow import MlflowClient

    from hvdkit.tracking._uri import resolve_tracking_uri

    movable = {"RUNNING", "SCHEDULED"} | ({"KILLED"} if status == "FAILED" else set())

    def settle() -> tuple[str, ...]:
        client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        changed = []
        now = int(time.time() * 1000)
        for run in job_runs(client, experiment_name(experiment), job_id):
            if run.info.status in movable:
                client.set_terminated(run.info.run_id, status, end_time=run.info.end_time or now)
                changed.append(run.info.run_id)
        return tuple(changed)

    got = _bounded(settle, timeout, "hvdkit-settle")
    if got is _NO_ANSWER:
        print(f"hvdkit: the MLflow store did not answer within {timeout:.0f}s; run statuses left as recorded",
              file=sys.stderr, flush=True)
        return ()
    if isinstance(got, Exception):
        print(f"hvdkit: could not settle run statuses ({got})", file=sys.stderr, flush=True)
        return ()
    return got


def launch_job(cmd: Sequence[str], env: dict[str, str], *, track: bool = True, experiment: str | None = None,
               tracking_uri: str | None = None, job_id: str | None = None, job: JobFolder | None = None) -> JobOutcome:
    """Run one job's launcher command (``cmd``) as job ``job_id`` (or ``job``'s) and settle its runs'
    status, and its folder's manifest, afterwards."""
    job_id = job.job_id if job is not None else job_id or new_job_id()
    env = dict(env)
    env[keys.ENV_JOB_ID] = job_id
    rc, sig = run_forwarding(cmd, env)
    # A signal decides: horovodrun can exit 0 after a Ctrl-C (see run_forwarding).
    status = "KILLED" if sig is not None else "FINISHED" if rc == 0 else "FAILED"
    settled: tuple[str, ...] = ()
    if job is not None and status != "FINISHED":
        job.settle(status)
    if track and status != "FINISHED":
        settled = settle_job_status(job_id, status, experiment=experiment, tracking_uri=tracking_uri)
        if settled:
            print(f"hvdkit: job {job_id} {status} (launcher exit code {rc}): "
                  f"{len(settled)} run(s) marked {status}", file=sys.stderr, flush=True)
    return JobOutcome(rc=rc, job_id=job_id, signal=sig, status=status, settled=settled)


__all__ = ["SETTLE_TIMEOUT_S", "JobOutcome", "check_baseline", "launch_job", "settle_job_status"]
