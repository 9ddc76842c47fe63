"""The background writer: training threads hand it events and never wait for MLflow.

Two daemon threads, so a slow or dead store never delays the spool:

* the spool thread drains the queue and appends events to ``events.jsonl`` (local disk);
* the apply thread reads the spool from its cursor and applies it to MLflow (see ``_apply``),
  retrying with backoff while the store is unavailable. A job's writer has the applying itself
  done by a child process (``_apply_process``), so MLflow's Python never holds training's GIL;
  the thread only relays requests and results.

Because the apply thread reads whatever has accumulated, a store that falls behind gets fewer,
fuller ``log_batch`` calls per run: the backlog itself is the batching.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hvdkit.tracking._apply_outcome import StoreUnavailable
from hvdkit.tracking._apply_process import ApplierProcess, ApplyProcessFailed
from hvdkit.tracking.keys import ENV_SQLITE_BULK_METRICS
from hvdkit.tracking._spool import Event, Spool
from hvdkit.tracking._uri import absolute_uri, is_remote

if TYPE_CHECKING:
    from hvdkit.tracking._apply import Applier

log = logging.getLogger("hvdkit.tracking")

_STOP = object()
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 30.0
# MLflow's REST client retries a failed request by itself: 7 times over ~4 minutes by default
# (backoff factor 2, up to 120 s apart), each attempt waiting up to 120 s. The apply thread has
# its own retry loop (above; the spool keeps every event meanwhile), so under it those retries
# only add delay: a store back from an outage was seen minutes late, close() gave up while a
# request still slept in urllib3, and a POST that urllib3 re-sent after a lost response could
# create a run twice (our own retries find it by its spool_ref tag instead). Defaults for the
# writer's process when the store is remote; a value the user set is kept.
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass(frozen=True)
class CloseReport:
    spooled: int  # events written to the spool
    applied: int  # of which applied to the store
    spool_dir: str
    dropped: int = 0

    @property
    def pending(self) -> int:
        return self.spooled - self.applied


class SpoolWriter:
    def __init__(self, spool: Spool, tracking_uri: str, *, keep_spool: bool = False, apply_process: bool = False) -> None:
        self.spool = spool
        self.tracking_uri = absolute_uri(tracking_uri)
        self.keep_spool = keep_spool
        spool.lock()
        if is_remote(self.tracking_uri):
            for name, value in _MLFLOW_HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)  # read by MLflow at each request
        self._queue: queue.Queue[object] = queue.Queue()  # unbounded: put never blocks training
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._spooled = 0
        self._applied = 0
        self._failures = 0
        self._healthy = True  # the last store attempt worked (or none was made yet)
        self._spool_done = False
        self._spool_failed = False
        self._closing = False
        self._abandon = False
        self._closed: CloseReport | None = None
        self._run_ids: dict[str, str] = {}
        workers = 4 if is_remote(self.tracking_uri) else 1
        # A job's writer applies from a process of its own (see _apply_process: MLflow's Python
        # takes no GIL from training); the thread-local Applier serves tools and unit tests.
        # (Applier imports MLflow: only when it is the one used.)
        if apply_process:
            applier_type = ApplierProcess
        else:
            from hvdkit.tracking._apply import Applier as applier_type
        self._applier: Applier | ApplierProcess = applier_type(
            spool, self.tracking_uri, workers=workers, on_run_created=self._created
        )
        self._spool_thread = threading.Thread(target=self._spool_loop, name="hvdkit-spool", daemon=True)
        self._apply_thread = threading.Thread(target=self._apply_loop, name="hvdkit-apply", daemon=True)
        self._spool_thread.start()
        self._apply_thread.start()

    # -- training-thread side -------------------------------------------------------------
    def submit(self, event: Event | object) -> None:
        """Queue an event dict, or an object whose ``events()`` returns event dicts (expanded on
        the spool thread). Never blocks."""
        if not self._closing:
            self._queue.put_nowait(event)

    @property
    def healthy(self) -> bool:
        """Whether the store answered the last time the writer tried it."""
        return self._healthy

    @property
    def run_ids(self) -> dict[str, str]:
        """ref -> MLflow run id, for the runs created or reopened so far."""
        with self._cond:
            return dict(self._run_ids)

    def wait_for_run(self, ref: str, timeout: float) -> str | None:
        """The run id of ``ref`` once created; None if the store failed first or on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            failures = self._failures
            while ref not in self._run_ids and self._failures == failures:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._run_ids.get(ref)

    def close(self, timeout: float = 30.0) -> CloseReport:
        """Spool everything, then give the store up to ``timeout`` s to catch up. What it could
        not take stays in the spool, announced by one line on stderr. Idempotent."""
        if self._closed is not None:
            return self._closed
        deadline = time.monotonic() + timeout
        self._closing = True
        self._queue.put(_STOP)
        self._spool_thread.join()  # local disk only: bounded
        self._wake.set()  # cut a backoff sleep short: try the store now
        with self._cond:
            while self._applied < self._spooled and self._apply_thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._abandon = True
            self._cond.notify_all()
        self._applier.close()  # a child's store call that outlives the deadline is cut short: idempotent
        # Usually quick (it returns on _abandon); in-thread, it may also be inside a store call that
        # outlives our deadline. It is a daemon and applying is idempotent, so we do not wait on it.
        self._apply_thread.join(1.0)
        report = CloseReport(self._spooled, self._applied, str(self.spool.dir), self._applier.stats.dropped)
        if self._spool_failed:
            lost = max(0, self._queue.qsize() - 1)  # minus the stop marker
            print(
                f"hvdkit tracking: writing the spool {self.spool.dir} failed; "
                f"{lost} later events were lost (see the error above)",
                file=sys.stderr,
                flush=True,
            )
        if report.pending == 0 and not self.keep_spool and not self._spool_failed:
            self.spool.remove()  # fully applied: the spool was only a buffer
        else:
            self.spool.unlock()  # ours no more: free for hvdkit sync
            if report.pending:
                print(
                    f"{report.pending} events spooled in {self.spool.dir}; replay with: hvdkit sync {self.spool.dir}",
                    file=sys.stderr,
                    flush=True,
                )
                if self._failures == 0 and self.tracking_uri.startswith("sqlite") and not self._applier.bulk_metrics:
                    # A healthy sqlite store that was still behind: MLflow's log_batch is one
                    # transaction per run, too slow for hundreds of child runs (see _sqlfast).
                    print(
                        f"hvdkit tracking: the sqlite store fell behind this job's metrics — fix: fewer child runs "
                        f"(log.per_rank_runs: k), or opt in to the bulk insert with {ENV_SQLITE_BULK_METRICS}=1",
                        file=sys.stderr,
                        flush=True,
                    )
        self._closed = report
        return report

    # -- threads --------------------------------------------------------------------------
    def _created(self, ref: str, run_id: str) -> None:
        with self._cond:
            self._run_ids[ref] = run_id
            self._cond.notify_all()

    def _spool_loop(self) -> None:
        f = self.spool.open_append()
        try:
            stop = False
            while not stop:
                batch = [self._queue.get()]
                while len(batch) < 10_000:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                lines = []
                for item in batch:
                    if item is _STOP:
                        stop = True
                        continue
                    # dict: one event; otherwise a deferred group (e.g. all child runs' metrics of
                    # one gather) that costs the training thread nothing but a put.
                    for ev in (item,) if isinstance(item, dict) else item.events():  # type: ignore[attr-defined]
                        try:
                            lines.append(self.spool.encode(ev))
                        except (TypeError, ValueError) as exc:  # one bad value must not stop the spool
                            log.warning("hvdkit tracking: event not spooled (%s): %.200r", exc, ev)
                if lines:
                    f.write("".join(lines))
                    f.flush()
                if stop:
                    os.fsync(f.fileno())
                with self._cond:
                    self._spooled += len(lines)
                    self._cond.notify_all()
        except Exception:  # never into training; close() reports what was not spooled
            log.exception("hvdkit tracking: writing the spool %s failed", self.spool.events_path)
            self._spool_failed = True
        finally:
            f.close()
            with self._cond:
                self._spool_done = True
                self._cond.notify_all()

    def _apply_loop(self) -> None:
        backoff = 0.0
        while True:
            if backoff and not self._closing:
                self._wake.wait(backoff)  # set by close(): retry at once from then on
            with self._cond:
                while not self._abandon and self._applied >= self._spooled:
                    if self._spool_done:
                        return
                    self._cond.wait()
                if self._abandon:
                    return
            try:
                n = self._applier.apply_next()
            except StoreUnavailable as exc:
                self._healthy = False
                backoff = min(_BACKOFF_MAX_S, backoff * 2) if backoff else _BACKOFF_START_S
                with self._cond:
                    self._failures += 1
                    if self._failures == 1:
                        log.warning(
                            "MLflow store %s unavailable (%s); spooling to %s and retrying",
                            self.tracking_uri,
                            exc,
                            self.spool.dir,
                        )
                    self._cond.notify_all()
                if self._closing:
                    time.sleep(min(backoff, 0.5))  # close() is waiting: retry soon, but do not spin
                continue
            except ApplyProcessFailed as exc:
                if not self._abandon:  # else close() ended the apply process under this call
                    log.error("hvdkit tracking: %s; the spool keeps the rest in %s", exc, self.spool.dir)
                with self._cond:
                    self._failures += 1
                    self._cond.notify_all()
                return
            except Exception:  # a bug in apply must not take training down, nor spin
                log.exception("hvdkit tracking: applying the spool failed; it stays in %s", self.spool.dir)
                with self._cond:
                    self._failures += 1
                    self._cond.notify_all()
                return
            backoff = 0.0
            self._healthy = True
            with self._cond:
                self._applied += n
                self._cond.notify_all()
