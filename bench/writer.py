"""Writer throughput: 512 ranks x 10 metrics per interval through hvdkit's real tracking writer.

The job is simulated, the path is not: the events are what ``JobTracker`` submits on rank 0 (a
parent run, one child run per rank, per interval one queue item that expands into one
``log_batch`` per child on the spool thread, plus the parent's), handed to the real
``SpoolWriter`` (spool file, apply thread, ``Applier``: MLflow's public client, with 4 request
threads for a server).

Two measurements per store:

* paced: one interval per ``interval_s`` (1 s) for ``intervals`` intervals; the backlog
  (events spooled but not yet in the store) is sampled just before each hand-off. It keeps up
  when the backlog stays bounded (the last third of the samples no higher than the first third,
  and under 2 intervals' worth) and the store has everything within one interval of the last
  hand-off.
* burst: ``burst`` intervals handed over at once; capacity = metric values / seconds to drain.
  ``capacity / offered`` (offered = the interval's values per second) is the headroom ratio.

Stores: a fresh sqlite file (a child run for every one of the 512 ranks), through MLflow's
``log_batch`` (the default) and again with the opt-in bulk insert (``HVDKIT_SQLITE_BULK_METRICS=1``,
hvdkit.tracking._sqlfast); and, when
``.ci/postgres`` and ``mlflow/server.sh`` are there and this runs as root, a real MLflow server
(basic auth, 2 workers) on a fresh PostgreSQL database (dropped afterwards), with a child run
for every 8th rank (``tracking per_rank_runs: 8``; the parent's sums still cover all 512).
``--full`` adds the server with all 512 child runs: creating them alone takes ~5 min here, and it
does not keep up (see docs/benchmarks.md). Without the server scripts that part is skipped.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

from bench import _common as C
from bench._server import MlflowServer as _Server
from hvdkit.tracking.keys import ENV_SQLITE_BULK_METRICS

BENCH = "writer"


class _Interval:
    """One gather's events for the child runs (expanded on the spool thread, like
    hvdkit.tracking._events.ChildRows) and the parent."""

    __slots__ = ("children", "keys", "step", "ts")

    def __init__(self, children: list[int], keys: list[str], step: int, ts: int) -> None:
        self.children, self.keys, self.step, self.ts = children, keys, step, ts

    def events(self) -> list[dict]:
        ts, step, keys = self.ts, self.step, self.keys
        out = [{"op": "log_batch", "ref": f"rank{r}",
                "metrics": [[k, float(r + j + step % 7) * 0.5, ts, step] for j, k in enumerate(keys)]}
               for r in self.children]
        out.append({"op": "log_batch", "ref": "parent", "metrics": [["samples_per_sec", 1000.0 + step, ts, step],
                                                                     ["loss", 1.0 / (1 + step), ts, step],
                                                                     ["straggler_ratio", 1.01, ts, step]]})
        return out


def _counts(w) -> tuple[int, int]:
    # The writer's own counters (events written to the spool / applied to the store).
    with w._cond:
        return w._spooled, w._applied


def _wait_applied(w, target: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spooled, applied = _counts(w)
        if applied >= target:
            return True
        time.sleep(0.02)
    return False


def _drive(label: str, uri: str, *, ranks: int, k: int, intervals: int, interval_s: float, burst: int,
           every: int = 1) -> list[dict]:
    from hvdkit.tracking._spool import Spool, now_ms
    from hvdkit.tracking._writer import SpoolWriter

    root = Path(tempfile.mkdtemp(prefix="hvdkit-bench-spool-"))
    job = f"bench-{secrets.token_hex(4)}"
    spool = Spool.create(root, job, uri)
    w = SpoolWriter(spool, uri)
    children = list(range(0, ranks, every))
    per_interval = len(children) + 1  # events: one log_batch per child + the parent's
    values_per_interval = len(children) * k + 3
    keys = [f"metric_{j}" for j in range(k)]
    out: list[dict] = []
    try:
        t0 = time.perf_counter()
        exp = f"bench-writer-{job}"
        w.submit({"op": "create_run", "ref": "parent", "parent_ref": None, "parent_run_id": None, "experiment": exp,
                  "run_name": f"writer-{ranks}", "tags": {"hvdkit.role": "parent"}, "start_time": now_ms()})
        for r in children:
            w.submit({"op": "create_run", "ref": f"rank{r}", "parent_ref": "parent", "parent_run_id": None,
                      "experiment": exp, "run_name": f"rank-{r}", "tags": {"hvdkit.role": "rank"}, "start_time": now_ms()})
        if w.wait_for_run(f"rank{children[-1]}", 900) is None:
            raise C.JobFailed(f"writer bench ({label}): the store did not create {len(children)} runs within 900 s")
        _wait_applied(w, len(children) + 1, 900)
        setup_s = time.perf_counter() - t0

        # paced: one interval per interval_s
        backlog: list[int] = []
        step = 0
        start = time.perf_counter()
        for i in range(intervals):
            delay = start + i * interval_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            spooled, applied = _counts(w)
            backlog.append(len(children) + 1 + i * per_interval - applied)  # handed over so far, not yet applied
            step += 1
            w.submit(_Interval(children, keys, step, now_ms()))
        last = time.perf_counter()
        target = len(children) + 1 + intervals * per_interval
        done = _wait_applied(w, target, 60 if len(children) > 100 and "sqlite" not in label else 300)
        drain_s = time.perf_counter() - last
        # The last interval occupies interval_s like the others; a drain longer than that is lag.
        paced_s = (last - start) + max(drain_s, interval_s)
        values = intervals * values_per_interval
        # The apply thread takes the whole backlog per window, so a store slower than the
        # interval shows a sawtooth, not zeros: it keeps up while the troughs do not rise (the
        # last third's lowest backlog no more than one interval above the middle third's).
        third = max(1, len(backlog) // 3)
        middle, final = backlog[third:2 * third] or backlog, backlog[-third:]
        keeps_up = bool(done and min(final) <= min(middle) + per_interval)
        if not done:  # what the store took by the end of the wait, not what was offered
            values = max(0, _counts(w)[1] - len(children) - 1) // per_interval * values_per_interval
        m = {"bench": BENCH, "kind": "measurement", "store": label, "mode": "paced", "ranks": ranks,
             "child_runs": len(children), "metrics_per_rank": k, "interval_s": interval_s, "intervals": intervals,
             "setup_s": round(setup_s, 2), "offered_values_per_s": round(values_per_interval / interval_s, 1),
             "sustained_values_per_s": round(values / paced_s, 1), "drain_after_last_s": round(drain_s, 3),
             "caught_up": done,
             "backlog_events": backlog, "backlog_intervals_max": round(max(backlog) / per_interval, 2),
             "keeps_up": keeps_up}
        out.append(C.emit(m))

        if not done:
            # Behind already: the capacity is what it applied while we watched.
            t, a0 = time.perf_counter(), _counts(w)[1]
            time.sleep(30)
            rate = (_counts(w)[1] - a0) / (time.perf_counter() - t) / per_interval * values_per_interval
            out.append(C.emit({"bench": BENCH, "kind": "measurement", "store": label, "mode": "backlogged",
                               "ranks": ranks, "child_runs": len(children), "capacity_values_per_s": round(rate, 1)}))
            return out
        # burst: capacity
        t = time.perf_counter()
        for _ in range(burst):
            step += 1
            w.submit(_Interval(children, keys, step, now_ms()))
        target += burst * per_interval
        done = _wait_applied(w, target, 600)
        burst_s = time.perf_counter() - t
        capacity = burst * values_per_interval / burst_s if done else float("nan")
        out.append(C.emit({"bench": BENCH, "kind": "measurement", "store": label, "mode": "burst", "ranks": ranks,
                           "child_runs": len(children), "intervals": burst, "seconds": round(burst_s, 3),
                           "capacity_values_per_s": round(capacity, 1), "drained": done}))
        return out
    finally:
        w.close(0)  # runs are left RUNNING: the store is thrown away
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _summarize(label: str, runs: list[list[dict]]) -> list[dict]:
    paced = [r[0] for r in runs]
    burst = [r[1] for r in runs]
    offered = paced[0]["offered_values_per_s"]
    res = [
        C.result(BENCH, f"{label}: applied values/s (paced, to the last)", [p["sustained_values_per_s"] for p in paced],
                 unit="values/s", store=label, offered=offered, keeps_up=all(p["keeps_up"] for p in paced)),
        C.result(BENCH, f"{label}: max backlog (intervals)", [p["backlog_intervals_max"] for p in paced], unit="ratio",
                 goal="bounded", check=lambda m: all(p["keeps_up"] for p in paced), store=label),
        C.result(BENCH, f"{label}: store lag after the last interval", [p["drain_after_last_s"] for p in paced],
                 unit="s", store=label),
        C.result(BENCH, f"{label}: capacity values/s (burst)", [b["capacity_values_per_s"] for b in burst],
                 unit="values/s", store=label),
        C.result(BENCH, f"{label}: capacity/offered", [b["capacity_values_per_s"] / offered for b in burst],
                 goal=">= 1.0", check=lambda m: m >= 1.0, store=label, ratio="capacity/offered"),
    ]
    return res


def run(quick: bool = False, reps: int | None = None, full: bool = False) -> list[dict]:
    ranks, k, interval_s = (64, 10, 0.25) if quick else (512, 10, 1.0)
    intervals, burst = (4, 4) if quick else (20, 20)
    reps = reps or (1 if quick else 2)
    out: list[dict] = []
    with C.TempStore("writer") as store:
        runs = [_drive("sqlite", store.uri, ranks=ranks, k=k, intervals=intervals, interval_s=interval_s, burst=burst)
                for _ in range(reps)]
    out += _summarize(f"sqlite, {ranks} child runs", runs)
    # The same with the opt-in sqlite bulk metric insert (hvdkit.tracking._sqlfast), the measured
    # reason it exists: MLflow's log_batch alone does not keep up with 512 child runs on sqlite.
    saved_bulk = os.environ.get(ENV_SQLITE_BULK_METRICS)
    os.environ[ENV_SQLITE_BULK_METRICS] = "1"
    try:
        with C.TempStore("writer-bulk") as store:
            runs = [_drive("sqlite-bulk", store.uri, ranks=ranks, k=k, intervals=intervals, interval_s=interval_s,
                           burst=burst) for _ in range(reps)]
    finally:
        if saved_bulk is None:
            os.environ.pop(ENV_SQLITE_BULK_METRICS, None)
        else:
            os.environ[ENV_SQLITE_BULK_METRICS] = saved_bulk
    out += _summarize(f"sqlite + {ENV_SQLITE_BULK_METRICS}=1, {ranks} child runs", runs)
    if quick:
        return out
    srv = _Server()
    why = srv.available()
    if why:
        C.emit({"bench": BENCH, "kind": "skipped", "store": "mlflow-server+postgresql", "why": why})
        C.note(f"writer: MLflow server on PostgreSQL skipped: {why}")
        return out
    saved = {k2: os.environ.get(k2) for k2 in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        srv.start()
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = srv.admin
        every = 8
        runs = [_drive("server", srv.url, ranks=ranks, k=k, intervals=intervals, interval_s=interval_s, burst=burst,
                       every=every)]
        out += _summarize(f"server+postgres, {ranks // every} child runs", runs)
        if full:
            runs = [_drive("server-all", srv.url, ranks=ranks, k=k, intervals=10, interval_s=interval_s, burst=burst)]
            out += _summarize(f"server+postgres, {ranks} child runs", runs)
    finally:
        for k2, v in saved.items():
            if v is None:
                os.environ.pop(k2, None)
            else:
                os.environ[k2] = v
        srv.stop()
    return out
