"""Bulk metric insert for sqlite stores: many runs, one transaction.

Why not ``MlflowClient.log_batch``: it is one transaction per run and builds one ORM object
per metric, about 0.3 ms a metric on a small host, so 512 ranks x 10 metrics a second does not
keep up (measured: ~2.5k metrics/s). This writes the same rows MLflow's SQL store writes for
``log_batch`` (``metrics`` + ``latest_metrics``, NaN/inf sanitized by the store's own
``sanitize_metric_value``, duplicates dropped on the primary key exactly as MLflow's retry path
does), with Core executemany, for all runs of a window at once.

It is used only when the store is MLflow's SqlAlchemyStore on sqlite; any surprise (a schema
that moved in a future MLflow) disables it and the applier falls back to ``log_batch``.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlflow import MlflowClient

Row = tuple[str, str, float, int, int]  # run id, key, value, timestamp ms, step

_CHUNK_RUNS = 500  # under sqlite's bound-variable limit for the IN (...) clause


class SqliteBulkMetrics:
    def __init__(self, store: object) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun

        self.store = store
        self._metrics = SqlMetric.__table__
        self._latest = SqlLatestMetric.__table__
        self._runs = SqlRun.__table__

    @classmethod
    def for_client(cls, client: MlflowClient) -> "SqliteBulkMetrics | None":
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = client._tracking_client.store
            if isinstance(store, SqlAlchemyStore) and getattr(store, "db_type", None) == "sqlite":
                return cls(store)
        except Exception:  # noqa: BLE001 - an internal that moved: use the public path
            pass
        return None

    def log(self, rows: Iterable[Row]) -> set[str]:
        """Insert ``rows``; returns the run ids skipped because their run is not active
        (deleted), which MLflow's log_batch would refuse too."""
        from sqlalchemy import insert, select, tuple_
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        rows = list(rows)
        run_ids = sorted({r[0] for r in rows})
        store = self.store
        with store.ManagedSessionMaker(read_only=False) as session:  # type: ignore[attr-defined]
            conn = session.connection()
            active: set[str] = set()
            for i in range(0, len(run_ids), _CHUNK_RUNS):
                chunk = run_ids[i : i + _CHUNK_RUNS]
                q = select(self._runs.c.run_uuid).where(
                    self._runs.c.run_uuid.in_(chunk), self._runs.c.lifecycle_stage == "active"
                )
                active.update(conn.execute(q).scalars())
            records = []
            latest: dict[tuple[str, str], dict] = {}
            sanitize = store.sanitize_metric_value  # type: ignore[attr-defined]
            for run_id, key, value, ts, step in rows:
                if run_id not in active:
                    continue
                is_nan, v = sanitize(value)
                rec = {"run_uuid": run_id, "key": key, "value": v, "timestamp": ts, "step": step, "is_nan": is_nan}
                records.append(rec)
                cur = latest.get((run_id, key))
                # MLflow's rule for the latest value: the greatest (step, timestamp, value).
                if cur is None or (step, ts, v) > (cur["step"], cur["timestamp"], cur["value"]):
                    latest[(run_id, key)] = rec
            if records:
                conn.execute(insert(self._metrics).prefix_with("OR IGNORE"), records)
                lt = self._latest
                up = sqlite_insert(lt)
                ex = up.excluded
                up = up.on_conflict_do_update(
                    index_elements=[lt.c.key, lt.c.run_uuid],
                    set_={"value": ex.value, "timestamp": ex.timestamp, "step": ex.step, "is_nan": ex.is_nan},
                    where=tuple_(ex.step, ex.timestamp, ex.value) > tuple_(lt.c.step, lt.c.timestamp, lt.c.value),
                )
                conn.execute(up, list(latest.values()))
        return set(run_ids) - active
