"""Applying spooled events to an MLflow store, idempotently by construction.

* a ref resolves to the run id recorded in the state, so a run is never created twice (a
  create that may have landed without us learning its id is found again by its spool_ref tag);
* the state's cursor skips events already applied;
* whatever is re-sent after a partial failure is identical (same key, value, timestamp, step;
  same param value; same tag value; same end status and time), which MLflow stores once.

Consecutive ``log_batch`` events of one run are merged and cut into MLflow-sized requests: a
``log_batch`` call costs a round trip (or a sqlite transaction) whatever its size, so fewer,
fuller calls are what lets 512 ranks' metrics keep up.

Only MLflow's public ``MlflowClient`` writes (``create_run``, ``log_batch``, ``set_terminated``...);
a sqlite store may opt in to the bulk metric insert of ``_sqlfast`` (off by default).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from hvdkit.tracking import _sqlfast, keys
from hvdkit.tracking._apply_outcome import ApplyStats, StoreUnavailable
from hvdkit.tracking._mlflow_private import batch_limits
from hvdkit.tracking._spool import Event, Spool, TargetState
from hvdkit.tracking._sqlfast import SqliteBulkMetrics

log = logging.getLogger("hvdkit.tracking")

# MLflow error codes that a retry cannot fix: the item is dropped (it stays in the spool file).
# Everything else (connection refused, 5xx, TEMPORARILY_UNAVAILABLE for "database is locked",
# auth) is treated as the store being unavailable: keep the event and retry later.
_PERMANENT = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"}
)
# A REST log_batch request is capped at 1 MB of JSON; params/tags can be 6-8 kB each.
_MAX_BATCH_BYTES = 800_000


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT


@dataclass
class _Pending:
    metrics: list[Metric] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def add(self, ev: Event) -> None:
        self.metrics.extend(Metric(k, v, ts, step) for k, v, ts, step in ev.get("metrics", ()))
        self.params.update(ev.get("params") or {})
        self.tags.update(ev.get("tags") or {})


def _chunks(p: _Pending):
    """MLflow-sized (metrics, params, tags) requests covering ``p``."""
    params = [Param(k, v) for k, v in p.params.items()]
    tags = [RunTag(k, v) for k, v in p.tags.items()]
    metrics = p.metrics
    limits = batch_limits()
    mi = 0
    while params or tags or mi < len(metrics):
        size = 0
        take_p: list[Param] = []
        take_t: list[RunTag] = []
        for src, dst in ((params, take_p), (tags, take_t)):
            while src and len(dst) < limits.params_tags:
                item_size = len(src[0].key) + len(src[0].value) + 32
                if dst and size + item_size > _MAX_BATCH_BYTES // 2:
                    break
                size += item_size
                dst.append(src.pop(0))
        room = min(limits.metrics, limits.entities - len(take_p) - len(take_t))
        take_m = metrics[mi : mi + room]
        mi += len(take_m)
        yield take_m, take_p, take_t


class Applier:
    """Brings one store up to date with one spool. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        spool: Spool,
        target_uri: str,
        *,
        client: MlflowClient | None = None,
        workers: int = 1,
        on_run_created: Callable[[str, str], None] | None = None,
        fast_sqlite: bool | None = None,
    ) -> None:
        self.spool = spool
        self.target_uri = target_uri
        self.job_id = spool.meta().get("job_id", spool.dir.name)
        self.state: TargetState = spool.load_state(target_uri)
        self._client = client
        self.workers = max(1, workers)
        self.stats = ApplyStats()
        self._on_run_created = on_run_created
        self._warned: set[str] = set()
        # The sqlite bulk insert is an opt-in (None: $HVDKIT_SQLITE_BULK_METRICS): the default path is
        # MLflow's public log_batch (see _sqlfast for when the opt-in is worth it).
        self._bulk: SqliteBulkMetrics | None = None
        self._bulk_checked = not (_sqlfast.enabled() if fast_sqlite is None else fast_sqlite)

    def close(self) -> None:
        """Nothing to end in-thread (ApplierProcess ends its child here)."""

    @property
    def bulk_metrics(self) -> bool:
        """Whether this applier may use the opted-in sqlite bulk insert (until it falls back)."""
        return self._bulk is not None or not self._bulk_checked

    @property
    def client(self) -> MlflowClient:
        # Built lazily: for a sqlite store this opens (and may migrate) the database, which must
        # happen on the writer thread, never the training thread.
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.target_uri)
        return self._client

    # -- one window -----------------------------------------------------------------------
    def apply_next(self, max_events: int = 5000) -> int:
        """Apply up to ``max_events`` events from the cursor on; returns how many were applied.
        Raises StoreUnavailable (cursor unchanged, run ids kept) when the store fails."""
        events, end = self.spool.read_from(self.state.offset, max_events)
        if not events:
            return 0
        try:
            self._apply_window(events)
        except StoreUnavailable:
            self._save()  # keep run ids learnt before the failure
            raise
        self.state.applied += len(events)
        self.state.offset = end
        self.state.creating = []
        self._save()
        self.stats.applied += len(events)
        return len(events)

    def _save(self) -> None:
        self.spool.save_state(self.target_uri, self.state)

    def _apply_window(self, events: Sequence[Event]) -> None:
        to_create = [ev["ref"] for ev in events if ev["op"] == "create_run" and ev["ref"] not in self.state.runs]
        new_intents = [r for r in to_create if r not in self.state.creating]
        if new_intents:
            # Recorded before calling the store: after a crash, these refs are searched by tag.
            self.state.creating.extend(new_intents)
            self._save()
        # Creates first (in order: a child needs its parent's id), then every run's metrics,
        # params and tags merged, then end_run / log_artifact in order. Moving the latter after
        # the metrics changes nothing in the end state (MLflow accepts metrics on an ended run,
        # and order between runs is irrelevant), and it lets a whole window's metrics merge.
        pending: dict[str, _Pending] = {}
        later: list[Event] = []
        for ev in events:
            op = ev["op"]
            if op == "create_run":
                self._create_run(ev)
            elif op == "reopen_run":
                self._reopen_run(ev)
            elif op == "log_batch":
                pending.setdefault(ev["ref"], _Pending()).add(ev)
            else:
                later.append(ev)
        self._flush_all(pending)
        for ev in later:
            op, ref = ev["op"], ev["ref"]
            if op == "end_run":
                self._call(ref, "end_run", lambda rid: self.client.set_terminated(rid, ev["status"], ev["end_time"]))
            elif op == "log_artifact":
                self._log_artifact(ref, ev)
            else:
                self._drop("unknown-op", f"unknown spool event {op!r} skipped")

    # -- operations -----------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], object]) -> bool:
        """Run one store call: True if done, False if rejected for good; raises StoreUnavailable."""
        try:
            fn()
            return True
        except Exception as exc:  # the store's failures come in many types (requests, sqlalchemy...)
            if is_permanent(exc):
                self._drop(what.split()[0], f"MLflow rejected {what}: {exc}")
                return False
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _call(self, ref: str, what: str, fn: Callable[[str], object]) -> bool:
        run_id = self.state.runs.get(ref)
        if run_id is None:
            self._drop(f"no-run-{what}", f"{what} for {ref!r} skipped: its run was never created")
            return False
        return self._guard(f"{what} on {ref}", lambda: fn(run_id))

    def _drop(self, kind: str, message: str) -> None:
        self.stats.dropped += 1
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s (further ones are counted, not repeated)", message)

    def _experiment_id(self, name: str) -> str:
        exp_id = self.state.experiments.get(name)
        if exp_id is not None:
            return exp_id
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = self.client.create_experiment(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)  # another job created it meanwhile
                assert exp is not None
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        self.state.experiments[name] = exp_id
        return exp_id

    def _find_created(self, exp_id: str, ref: str) -> str | None:
        tag = f"{self.job_id}/{ref}"
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{keys.TAG_SPOOL_REF}` = '{tag}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def _create_run(self, ev: Event) -> None:
        ref = ev["ref"]
        if ref in self.state.runs:
            return
        tags = dict(ev.get("tags") or {})
        tags[keys.TAG_SPOOL_REF] = f"{self.job_id}/{ref}"
        if ev.get("parent_ref"):
            parent = self.state.runs.get(ev["parent_ref"])
            if parent is not None:
                tags[keys.MLFLOW_PARENT_RUN_ID] = parent
        elif ev.get("parent_run_id"):
            tags[keys.MLFLOW_PARENT_RUN_ID] = ev["parent_run_id"]
        created: list[str] = []

        def create() -> None:
            exp_id = self._experiment_id(ev["experiment"])
            run_id = self._find_created(exp_id, ref) if ref in self.state.creating else None
            if run_id is None:
                run = self.client.create_run(exp_id, start_time=ev["start_time"], tags=tags, run_name=ev.get("run_name"))
                run_id = run.info.run_id
            created.append(run_id)

        if self._guard(f"create_run {ref}", create):
            self.state.runs[ref] = created[0]
            if self._on_run_created is not None:
                self._on_run_created(ref, created[0])

    def _reopen_run(self, ev: Event) -> None:
        """A resumed job's existing run: RUNNING again (its end_run comes later), and its ref mapped."""
        ref, run_id = ev["ref"], ev["run_id"]
        if self._guard(f"reopen_run {ref}", lambda: self.client.update_run(run_id, status="RUNNING")):
            self.state.runs[ref] = run_id
            if self._on_run_created is not None:
                self._on_run_created(ref, run_id)

    def _log_artifact(self, ref: str, ev: Event) -> None:
        local = self.spool.dir / ev["path"]
        if not local.exists():
            self._drop("artifact-missing", f"artifact {local} is missing from the spool; skipped")
            return
        if Path(local).is_dir():
            self._call(ref, "log_artifacts", lambda rid: self.client.log_artifacts(rid, str(local), ev.get("artifact_path")))
        else:
            self._call(ref, "log_artifact", lambda rid: self.client.log_artifact(rid, str(local), ev.get("artifact_path")))

    def _flush(self, ref: str, p: _Pending) -> None:
        run_id = self.state.runs.get(ref)
        if run_id is None:
            self._drop("no-run-log_batch", f"metrics for {ref!r} skipped: its run was never created")
            return
        for metrics, params, tags in _chunks(p):
            if self._guard(f"log_batch on {ref}", lambda: self.client.log_batch(run_id, metrics, params, tags)):
                continue
            # Rejected for good: find the culprit rather than lose the whole request
            # (e.g. a param whose value changed between two events).
            if metrics:
                self._guard(f"metrics of {ref}", lambda: self.client.log_batch(run_id, metrics=metrics))
            for item in params:
                self._guard(f"param {item.key} of {ref}", lambda item=item: self.client.log_batch(run_id, params=[item]))
            for item in tags:
                self._guard(f"tag {item.key} of {ref}", lambda item=item: self.client.log_batch(run_id, tags=[item]))

    def _bulk_metrics(self, pending: dict[str, _Pending]) -> None:
        """sqlite, opted in: all runs' metrics in one transaction (see _sqlfast); the params and tags left
        in ``pending`` go through log_batch as usual."""
        assert self._bulk is not None
        rows = []
        refs = []
        for ref, p in pending.items():
            run_id = self.state.runs.get(ref)
            if run_id is None or not p.metrics:
                continue
            refs.append(ref)
            rows.extend((run_id, m.key, m.value, m.timestamp, m.step) for m in p.metrics)
        if not rows:
            return
        try:
            inactive = self._bulk.log(rows)
        except MlflowException as exc:
            if exc.error_code == "TEMPORARILY_UNAVAILABLE":  # "database is locked": retry later
                raise StoreUnavailable(str(exc)) from exc
            log.warning("bulk sqlite metric insert failed (%s); using MLflow's log_batch from now on", exc)
            self._bulk = None
            return
        except Exception as exc:  # noqa: BLE001 - an MLflow internal that changed
            log.warning("bulk sqlite metric insert failed (%s); using MLflow's log_batch from now on", exc)
            self._bulk = None
            return
        for ref in refs:
            pending[ref].metrics = []
        if inactive:
            self._drop("inactive-run", f"metrics for deleted run(s) {sorted(inactive)[:3]} skipped")

    def _flush_all(self, pending: dict[str, _Pending]) -> None:
        if not pending:
            return
        if self._bulk is None and not self._bulk_checked:
            self._bulk_checked = True
            self._bulk = SqliteBulkMetrics.for_client(self.client)
        if self._bulk is not None:
            self._bulk_metrics(pending)
            pending = {ref: p for ref, p in pending.items() if p.metrics or p.params or p.tags}
            if not pending:
                return
        if self.workers == 1 or len(pending) == 1:
            for ref, p in pending.items():
                self._flush(ref, p)
            return
        # Remote store: requests for different runs overlap their round trips. Every run's
        # requests are still sequential, and a failure anywhere leaves the cursor in place.
        # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at
        # exit, so a request to a dead or hung store would hold the finished job's rank 0 open
        # after SpoolWriter.close() had given up on it.
        items = list(pending.items())
        errors: list[BaseException] = []

        def work() -> None:
            while True:
                try:
                    ref, p = items.pop()
                except IndexError:
                    return
                try:
                    self._flush(ref, p)
                except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                    errors.append(exc)

        threads = [threading.Thread(target=work, name="hvdkit-apply-io", daemon=True)
                   for _ in range(min(self.workers, len(items)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
