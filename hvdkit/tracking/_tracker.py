"""The job tracker: what the framework trainers call, on every rank.

Only rank 0 writes (see _runs for the runs' layout); it learns every rank's numbers from a
gather every ``log_every`` steps, so the other ranks never touch the store and the store sees
one client.

Hot path: ``record_step`` adds six numbers to running sums. Once per interval every rank
builds a 6-float vector and joins the gather (a collective: every rank calls it at the same
steps, which holds because steps are counted identically everywhere).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hvdkit.errors import TrackingError, UsageError
from hvdkit.tracking import _runs, keys
from hvdkit.tracking._config import STATUSES, TrackingConfig, sampling, validate_experiment
from hvdkit.tracking._events import Batch, ChildRows
from hvdkit.tracking._rank import NullWriter, rank_zero_only
from hvdkit.tracking._spool import Spool, now_ms
from hvdkit.tracking._uri import absolute_uri, resolve_tracking_uri
from hvdkit.tracking._validate import (
    check_metric_name,
    check_metric_value,
    clean_tags,
    flatten_params,
)
from hvdkit.tracking._world import World
from hvdkit.tracking._writer import CloseReport, SpoolWriter

log = logging.getLogger("hvdkit.tracking")

_NCOLS = len(keys.RANK_VECTOR)
_SPS, _STEP, _DATA, _COMM, _LOSS, _RSS, _LAYER, _PEAK, _PARAMS, _SYS = range(10)
# Sparse keys last (table[:, :_PEAK] is dense): the two thinned ones (a point when they move), then
# the system metrics (a point when the host's sampler has a new sample, NaN elsewhere).
_THIN_COLS = [_PEAK, _PARAMS]
assert set(keys.RANK_VECTOR[_PEAK:]) == keys.SPARSE_RANK_KEYS and keys.RANK_VECTOR[_SYS:] == keys.SYSTEM_VECTOR


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux: ru_maxrss in KiB; macOS: bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1048576.0 if sys.platform == "darwin" else 1024.0)


class JobTracker:
    """One job's tracking, on one rank. Every rank makes the same calls in the same order."""

    def __init__(
        self,
        config: TrackingConfig,
        world: World,
        gather: Callable[[np.ndarray], Any],
        broadcast_object: Callable[[object], object],
        writer: SpoolWriter | NullWriter,
        job_id: str | None,
        gather_async: Callable[[np.ndarray], Callable[[], Any]] | None = None,
    ) -> None:
        self.config = config
        self.world = world
        self.run_id: str | None = None
        self.job_id = job_id
        self.close_report: CloseReport | None = None
        self._gather_fn = gather
        # Optional: starts the same allgather and returns a function that waits for its table.
        # With it, an interval's gather runs in the background while the next interval trains
        # and is collected at the next gather (a synchronous gather costs every rank a Horovod
        # cycle each interval: bench/tracking, fast-step recipe). Every rank still calls it at
        # the same steps.
        self._gather_async = gather_async
        self._inflight: tuple[int, int, Callable[[], Any]] | None = None  # (step, ts, wait)
        self._broadcast = broadcast_object
        self._writer = writer
        self._log_every = config.log_every
        # layer_comm_s only where the model is split: elsewhere it would be a column of zeros.
        self._skip = frozenset(config.skip_keys) | (frozenset({keys.LAYER_COMM_S}) if config.parallel_model == 1 else frozenset())
        self._parameters = math.nan  # set_model_size(); NaN (not logged) until the framework layer says
        self._sparse_sent: dict[str, np.ndarray] = {}  # rank 0: child ref -> the sparse values last logged
        self._sampling = sampling(config.per_rank_runs)
        self._children = list(range(0, world.size, self._sampling)) if self._sampling else []
        self._child_refs: list[str] | None = None  # elastic jobs: the ref of each of _children (membership_changed)
        self._emit = rank_zero_only(world.rank)(self._emit_gather)
        self._system_points = 0  # readings this rank's sampler has put in a gather
        self._sampler: Any = None  # _system.HostSampler, on the one rank per host that samples it
        self._sys_tagged = False  # rank 0: the sampling ranks' child runs are tagged with their host
        self._started = False
        self._finished = False
        self._proc: Any = None
        self._history: list[float] = []  # parent samples_per_sec per gather (every rank)
        self._nonfinite = 0
        self._baseline: Any = None  # efficiency.Baseline checked by start()
        self._parent_tags: dict[str, str] = {}
        self._reset()
        self._last_step = 0
        self._pending: list = []  # rank 0: gathered metrics not yet handed to the writer
        self._flush_every = max(0.0, float(config.flush_every_s))
        self._next_flush = 0.0  # monotonic time of the next hand-off; the first gather goes at once

    def run_ids(self) -> dict[str, str]:
        """Rank 0: the MLflow run id of each ref the writer has created or reopened so far."""
        return dict(getattr(self._writer, "run_ids", {}) or {})

    @property
    def spool_dir(self) -> str | None:
        spool = getattr(self._writer, "spool", None)
        return str(spool.dir) if spool is not None else None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        """Create the runs (rank 0) and share the parent run id. A collective (one broadcast)."""
        if self._started:
            raise UsageError("JobTracker.start() called twice", fix="call start() once per job")
        run_id = error = None
        if self.world.rank == 0:
            try:
                # Names checked on rank 0 alone (MLflow's rules: an import of MLflow the other ranks
                # need not pay); a bad one is shared below, so it fails every rank instead of hanging one.
                validate_experiment(self.config)
                flat = flatten_params(params)
                user_tags = clean_tags(tags)
                self._check_baseline(user_tags)
                run_id = self._create_runs(flat, user_tags)
            except TrackingError as exc:
                error = exc.one_line()  # shared below, so every rank raises, none hangs
        shared = self._broadcast({"run_id": run_id, "job_id": self.job_id, "error": error})
        if isinstance(shared, Mapping):
            self.run_id = shared.get("run_id")
            self.job_id = shared.get("job_id")
            error = shared.get("error")
        if error:
            self._finished = True
            self._writer.close(0)
            raise TrackingError(error)
        self._started = True
        self._update_sampler()

    def _client(self):
        return _runs.client(self.config)

    def _check_baseline(self, user_tags: Mapping[str, str]) -> None:
        """An explicit baseline is checked before anything is created: a typo must fail the
        launch, not surface after hours of training."""
        cfg = self.config
        if not (cfg.baseline_run_id and cfg.log_efficiency):
            return
        from mlflow.exceptions import MlflowException

        try:
            self._baseline = _runs.explicit_baseline(cfg, user_tags.get(keys.TAG_RECIPE, ""))
        except MlflowException as exc:  # store unreachable: the job still runs (and spools)
            log.warning("cannot check --baseline %s now (%s); scaling_efficiency will not be logged", cfg.baseline_run_id, exc)

    def _log_efficiency(self) -> None:
        """Rank 0, at a FINISHED end: scaling_efficiency = T_N / (N * T_1) on the parent."""
        cfg, n = self.config, self.world.size
        if not cfg.log_efficiency or (n == 1 and not cfg.baseline_run_id):
            return
        from hvdkit.tracking.efficiency import scaling_efficiency

        t_n = self.throughput()
        base = self._baseline
        if t_n is None:
            return
        if base is None and not cfg.baseline_run_id:
            if not self._writer.healthy:
                # A lookup would wait on the same dead store (MLflow retries for minutes).
                print("MLflow store unreachable: scaling_efficiency not logged", file=sys.stderr, flush=True)
                return
            try:
                base = _runs.matching_baseline(cfg, self._parent_tags)
            except Exception as exc:  # noqa: BLE001 - a lookup failure must not fail a finished job
                log.warning("np=1 baseline lookup failed (%s): scaling_efficiency not logged", exc)
                return
        if base is None:
            if not cfg.baseline_run_id:
                print("no np=1 baseline: scaling_efficiency not logged", file=sys.stderr, flush=True)
            return
        eff = scaling_efficiency(t_n, n, base.samples_per_sec)
        self._writer.submit(
            {
                "op": "log_batch",
                "ref": "parent",
                "metrics": [[keys.SCALING_EFFICIENCY, eff, now_ms(), self._last_step]],
                "tags": {keys.TAG_BASELINE_RUN_ID: base.run_id},
            }
        )

    def _create_runs(self, params: dict[str, str], user_tags: dict[str, str]) -> str | None:
        cfg = self.config
        tags = _runs.parent_tags(cfg, self.world, self.job_id, self._sampling, user_tags)
        self._parent_tags = tags
        for event in _runs.creation_events(cfg, self.world, tags, params, self._children, now_ms()):
            self._writer.submit(event)
        run_id = self._writer.wait_for_run("parent", cfg.start_timeout_s)
        if run_id and self._children:
            # Let the writer also create the child runs before training starts, so their store
            # transactions do not take CPU from the first training steps; bounded, because a
            # server creating hundreds of child runs takes minutes and training need not wait.
            self._writer.wait_for_run(f"rank{self._children[-1]}", _runs.CHILD_RUNS_WAIT_S)
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        """Flush the last partial interval, end every run with ``status``, flush the writer.

        With FINISHED the flush is a gather (a collective, like every interval). With FAILED or
        KILLED it is skipped: the job is going down, a peer may already be gone, and a collective
        would hang the ranks still alive. Idempotent.
        """
        if status not in STATUSES:
            raise UsageError(f"run status {status!r} is not one of {', '.join(STATUSES)}", fix="pass FINISHED, FAILED or KILLED")
        if self._finished:
            return
        if status == "FINISHED" and self._started:
            self._collect_inflight()
            if self._n:
                self._gather(self._last_step, final=True)
        # FAILED / KILLED: an in-flight gather is never waited for (a peer may be gone), but one
        # that already completed on every rank is kept: its metrics are the job's last ones.
        if self._inflight is not None and self.world.rank == 0 and self._started:
            done = getattr(self._inflight[2], "done", None)
            try:
                if done is not None and done():
                    self._collect_inflight()
            except Exception:  # noqa: BLE001 - Horovod may already be shut down: the gather is lost
                pass
        self._inflight = None
        self._finished = True
        self._stop_sampler()
        if self.world.rank != 0:
            return
        self._flush_pending()
        if self._started and status == "FINISHED":
            self._log_efficiency()
        if self._started:
            end = now_ms()
            for ref in self._child_refs or [f"rank{r}" for r in self._children]:
                self._writer.submit({"op": "end_run", "ref": ref, "status": status, "end_time": end})
            self._writer.submit({"op": "end_run", "ref": "parent", "status": status, "end_time": end})
        self.close_report = self._writer.close(self.config.close_timeout_s)

    def __enter__(self) -> "JobTracker":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- per step -------------------------------------------------------------------------
    def _reset(self) -> None:
        self._n = 0
        self._samples = 0
        self._step_t = 0.0
        self._data_t = 0.0
        self._comm_t = 0.0
        self._layer_t = 0.0
        self._loss = 0.0

    def record_step(
        self,
        step: int,
        *,
        samples: int,
        step_time_s: float,
        data_time_s: float,
        comm_wait_s: float,
        loss: float,
        layer_comm_s: float = 0.0,
    ) -> None:
        """Account one training step (Python numbers: a framework tensor here would sync the
        device and keep a graph alive). Every ``log_every`` steps: gather, on every rank."""
        self._n += 1
        self._samples += samples
        self._step_t += step_time_s
        self._data_t += data_time_s
        self._comm_t += comm_wait_s
        self._layer_t += layer_comm_s
        self._loss += loss
        self._last_step = step
        if step % self._log_every == 0:
            self._gather(step)

    def set_model_size(self, parameters: int) -> None:
        """The number of model parameters this rank holds (its slice when the model is split):
        logged on its child run at the next gather. Every rank calls it; no collective."""
        self._parameters = float(parameters)

    def _rss_mb(self) -> float:
        if self._proc is None:
            import psutil

            self._proc = psutil.Process(os.getpid())
        return self._proc.memory_info().rss / 1048576.0

    def _collect_inflight(self) -> None:
        if self._inflight is not None:
            step, ts, wait = self._inflight
            self._inflight = None
            table = np.asarray(wait(), dtype=np.float64).reshape(self.world.size, _NCOLS)
            self._record_history(table)
            self._emit(step, table, ts)

    def _gather(self, step: int, final: bool = False) -> None:
        if not self._started or self._finished:
            raise UsageError(
                "JobTracker.record_step() outside start() ... finish()", fix="call start() before training, finish() after"
            )
        n = self._n or 1
        span = self._step_t + self._data_t
        vec = np.empty(_NCOLS, dtype=np.float64)
        vec[_SPS] = self._samples / span if span > 0 else math.nan
        vec[_STEP] = self._step_t / n
        vec[_DATA] = self._data_t / n
        vec[_COMM] = self._comm_t / n
        vec[_LOSS] = self._loss / n
        vec[_RSS] = self._rss_mb()
        vec[_LAYER] = self._layer_t / n
        vec[_PEAK] = _peak_rss_mb()
        vec[_PARAMS] = self._parameters
        sample = None
        if self._sampler is not None:
            sample = self._sampler.latest()
            if sample is None and (final or not self._system_points):
                # The first gather and the job's last one take a reading of their own when none
                # is waiting: a job shorter than the interval still shows its host, and a job
                # ends with its host's state (milliseconds, on the sampling thread).
                sample = self._sampler.fresh(1.0)
            self._system_points += sample is not None
        vec[_SYS:] = math.nan if sample is None else sample
        self._reset()
        if self._gather_async is not None and not final:
            # The previous interval's gather finished long ago (an interval of training ran
            # since): collect it first, so one gather of this name is in flight at a time.
            self._collect_inflight()
            self._inflight = (step, now_ms(), self._gather_async(vec))
            return
        table = np.asarray(self._gather_fn(vec), dtype=np.float64).reshape(self.world.size, _NCOLS)
        self._record_history(table)
        self._emit(step, table)

    def _job_rate(self, table: np.ndarray) -> float:
        """The job's samples/s: the ranks' sum, counting once a sample that the M ranks of a model
        copy all process (each holds a slice of the same forward pass)."""
        return math.fsum(table[:, _SPS].tolist()) / self.config.parallel_model

    def _record_history(self, table: np.ndarray) -> None:
        # Every rank, not only the writer: the table is an allgather, and a survivor that becomes
        # rank 0 of an elastic job needs the job's throughput so far (membership epochs' T).
        if keys.SAMPLES_PER_SEC not in self._skip:
            self._history.append(self._job_rate(table))

    def _emit_gather(self, step: int, table: np.ndarray, ts: int | None = None) -> None:
        ts = now_ms() if ts is None else ts
        submit = self._pending.append
        measured = table[:, :_PEAK]  # the sparse columns hold NaN for "not known" (see _thin_sparse)
        if not np.isfinite(measured).all():
            self._report_nonfinite(step, measured)
        if self._children:
            # One queue item for all children, expanded into per-run events on the spool thread:
            # with 512 ranks, building 512 events here would cost rank 0 (and, through the next
            # collective, every rank) milliseconds per interval.
            self._tag_sampled_hosts()
            submit(ChildRows(self._thin_sparse(table[self._children]), self._children, ts, step, self._skip, self._child_refs))
        step_times = table[:, _STEP]
        metrics = [[keys.WORLD_SIZE, float(self.world.size), ts, step]]
        if keys.SAMPLES_PER_SEC not in self._skip:
            # fsum: the exact sum of the values the children store, whatever order one adds them in.
            total = self._job_rate(table)
            metrics.append([keys.SAMPLES_PER_SEC, total, ts, step])
        if keys.LOSS not in self._skip:
            metrics.append([keys.LOSS, math.fsum(table[:, _LOSS].tolist()) / self.world.size, ts, step])
        median = float(np.median(step_times))
        if median > 0 and math.isfinite(median):
            metrics.append([keys.STRAGGLER_RATIO, float(step_times.max()) / median, ts, step])
        submit({"op": "log_batch", "ref": "parent", "metrics": metrics})
        now = time.monotonic()
        if now >= self._next_flush:
            self._flush_pending()
            self._next_flush = now + self._flush_every

    def _thin_sparse(self, rows: np.ndarray) -> np.ndarray:
        """Blank (NaN: ChildRows skips it) each sparse key that did not move since the child run's
        last point: peak RSS by less than 1 MiB, the parameter count at all."""
        refs = self._child_refs or [f"rank{r}" for r in self._children]
        for i, ref in enumerate(refs):
            now = rows[i, _THIN_COLS]
            last = self._sparse_sent.get(ref)
            if last is None:
                self._sparse_sent[ref] = now.copy()
                continue
            same = ~(np.abs(now - last) >= 1.0)  # NaN on either side counts as unchanged
            rows[i, _THIN_COLS] = np.where(same, np.nan, now)
            last[~same] = now[~same]
        return rows

    def _tag_sampled_hosts(self) -> None:
        """Rank 0, once per world: tag each sampling rank's child run with the host its system/
        keys describe (a point there is the whole host, not the rank). Which ranks sample is
        known from the hostnames alone (_system.sampler_ranks), as each rank decided it."""
        hosts = self.world.hostnames
        if self._sys_tagged or not hosts or not self.config.system_metrics_interval_s > 0:
            return
        from hvdkit.tracking._system import sampler_ranks

        self._sys_tagged = True
        refs = dict(zip(self._children, self._child_refs or [f"rank{r}" for r in self._children]))
        for rank in sorted(sampler_ranks(hosts, self._children)):
            self._pending.append({"op": "log_batch", "ref": refs[rank], "metrics": [],
                                  "tags": {keys.TAG_SYSTEM_METRICS_HOST: hosts[rank]}})

    # -- system metrics -------------------------------------------------------------------
    def _samples_host(self) -> bool:
        """Whether this rank is its host's sampler (see _system.sampler_ranks); every rank decides
        for itself from the world it was handed, no collective."""
        if not self.config.system_metrics_interval_s > 0 or self.world.rank not in self._children:
            return False
        if self.world.hostnames:
            from hvdkit.tracking._system import sampler_ranks

            return self.world.rank in sampler_ranks(self.world.hostnames, self._children)
        return self.world.local_rank == 0  # hostnames not exchanged: the launcher's local rank

    def _update_sampler(self) -> None:
        """Start or stop this rank's sampler for the current world (start, membership changes)."""
        want = self._started and not self._finished and self._samples_host()
        if want and self._sampler is None:
            from hvdkit.tracking._system import HostSampler

            try:
                self._sampler = HostSampler(self.config.system_metrics_interval_s)
            except Exception as exc:  # noqa: BLE001 - no system metrics is no reason to fail training
                log.warning("hvdkit: warning: system metrics not sampled (%s)", exc)
        elif not want:
            self._stop_sampler()

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    def _flush_pending(self) -> None:
        """Hand the buffered gathers to the writer (one queue item). Called before any other
        event is submitted, so the writer still sees events in the order they were made."""
        if self._pending:
            self._writer.submit(Batch(self._pending))
            self._pending = []

    def _report_nonfinite(self, step: int, table: np.ndarray) -> None:
        # MLflow stores NaN and clamps +-inf, so the values are kept (a diverged loss is worth
        # seeing); the first occurrence is named so it is not silent.
        bad = np.argwhere(~np.isfinite(table))
        if self._nonfinite == 0:
            r, c = (int(x) for x in bad[0])
            log.warning(
                "rank %d reported %s=%s at step %d (kept: MLflow stores NaN/inf); further ones are counted",
                r,
                keys.RANK_VECTOR[c],
                table[r, c],
                step,
            )
        self._nonfinite += len(bad)

    # -- other logging --------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Parent-run metrics already reduced over ranks (val_loss...). Rank 0 writes them."""
        if not self._started or self._finished:
            raise UsageError("JobTracker.log_metrics() outside start() ... finish()", fix="log between start() and finish()")
        writes = self.world.rank == 0  # a rank that does not write imports no MLflow (docs/testing.md)
        rows = [[check_metric_name(k, import_mlflow=writes), check_metric_value(k, v), 0, int(step)]
                for k, v in metrics.items()]
        if not writes:
            return
        ts = now_ms()
        for row in rows:
            row[2] = ts
        self._flush_pending()
        self._writer.submit({"op": "log_batch", "ref": "parent", "metrics": rows})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Attach a file or directory to the parent run; copied into the spool now (rank 0)."""
        if self.world.rank != 0 or self._finished:
            return
        spool = getattr(self._writer, "spool", None)
        if spool is None:
            return
        rel = spool.stage_artifact(path)
        self._flush_pending()
        self._writer.submit({"op": "log_artifact", "ref": "parent", "path": rel, "artifact_path": artifact_path})

    def throughput(self) -> float | None:
        """This job's T: mean parent samples_per_sec, without the first (warm-up) interval when
        there are at least two (every rank gets the gathered table). None before any gather."""
        from hvdkit.tracking.efficiency import history_throughput

        return history_throughput(self._history)

    # -- elastic jobs (driven by hvdkit.tracking._membership) -------------------------------
    def membership_changed(self, world: World, step: int, child_refs: Mapping[int, str] | None = None) -> None:
        """After an elastic reset, on every rank at the same point: abandon the in-flight gather
        (Horovod's reset invalidated it; its peers may be gone), drop the partial interval, and
        go on with ``world``. ``child_refs``: rank -> ref of that worker's child run (None:
        ``rank<r>`` refs, as a fixed-size job has)."""
        self._inflight = None
        self._reset()
        self.world = world
        if child_refs is None:
            self._children = list(range(0, world.size, self._sampling)) if self._sampling else []
            self._child_refs = None
        else:
            self._children = sorted(child_refs)
            self._child_refs = [child_refs[r] for r in self._children]
        self._last_step = step
        self._emit = rank_zero_only(world.rank)(self._emit_gather)
        self._sys_tagged = False  # a new world: its sampling ranks' runs get their host tag
        self._update_sampler()

    def flush_interval(self) -> None:
        """Gather the interval so far now (a collective, every rank at the same step): before a
        planned membership change, while the old world still stands."""
        self._collect_inflight()
        if self._n:
            self._gather(self._last_step, final=True)

    def adopt(self, run_id: str | None, job_id: str | None) -> None:
        """A worker that joined a running elastic job: its runs exist (rank 0 writes them)."""
        self.run_id, self.job_id = run_id, job_id
        self._started = True

    def take_over_writer(self, runs: Mapping[str, str], spool_name: str, parent_tags: Mapping[str, str]) -> None:
        """Elastic jobs: rank 0's process died and this survivor is rank 0 now. Write the job's
        existing runs (``runs``: ref -> run id, seeded into a spool of its own) from here on."""
        from hvdkit.tracking._spool import TargetState

        uri = resolve_tracking_uri(self.config.tracking_uri)
        spool = Spool.create(self.config.spool_dir, str(self.job_id), absolute_uri(uri), name=spool_name)
        spool.save_state(absolute_uri(uri), TargetState(runs=dict(runs)))
        self._writer = SpoolWriter(spool, uri, keep_spool=self.config.keep_spool, apply_process=True)
        self._parent_tags = dict(parent_tags)

    def submit_events(self, events: list[dict]) -> None:
        """Rank 0: hand spool events to the writer, after the gathers buffered before them."""
        if self.world.rank != 0 or self._finished or not events:
            return
        self._flush_pending()
        for event in events:
            self._writer.submit(event)


__all__ = ["JobTracker"]
