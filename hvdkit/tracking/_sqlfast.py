"""Opt-in bulk metric insert for sqlite stores: many runs, one transaction.

Off by default: the default path is MLflow's public ``MlflowClient.log_batch``. Opt in with
``HVDKIT_SQLITE_BULK_METRICS=1`` (``keys.ENV_SQLITE_BULK_METRICS``) in the environment of rank
0 (the process that writes) and of ``hvdkit sync``.

Why it exists: ``log_batch`` is one transaction per run and builds one ORM object per metric,
so on a sqlite store 512 ranks x 10 metrics a second does not keep up. Measured with the writer
bench (``python -m bench writer``, 512 child runs, 5,123 values/s offered, 2-core host):
log_batch drains 4,661 values/s (capacity/offered 0.91; paced, the backlog grew to 11 intervals,
11 s behind at the end); this insert drains 39,573 values/s (7.7). Under about 460 child runs
at 10 metrics a second, or with ``log.per_rank_runs: k``, the public path keeps up and this is not
needed; a server store (REST) never uses it.

Why it is not the default: it writes MLflow's ``metrics`` and ``latest_metrics`` tables itself,
skipping MLflow's own validation and relying on its schema (reached through MLflow internals,
see ``_mlflow_private.sqlite_metric_tables``). It writes the same rows ``log_batch`` would
(NaN/inf sanitized by the store's own ``sanitize_metric_value``, duplicates dropped on the
primary key as MLflow's retry path does, the latest value by MLflow's (step, timestamp, value)
rule), with Core executemany, for all runs of a window at once. Any surprise (an internal that
moved, a schema that changed) disables it and the applier falls back to ``log_batch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from hvdkit.tracking import keys
from hvdkit.tracking._mlflow_private import SqliteMetricTables, sqlite_metric_tables

Row = tuple[str, str, float, int, int]  # run id, key, value, timestamp ms, step

_CHUNK_RUNS = 500  # under sqlite's bound-variable limit for the IN (...) clause


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process opted in (``HVDKIT_SQLITE_BULK_METRICS`` = 1, true, yes or on)."""
    env = os.environ if env is None else env
    return env.get(keys.ENV_SQLITE_BULK_METRICS, "").strip().lower() in ("1", "true", "yes", "on")


class SqliteBulkMetrics:
    def __init__(self, tables: SqliteMetricTables) -> None:
        self.tables = tables

    @classmethod
    def for_client(cls, client: object) -> "SqliteBulkMetrics | None":
        """The bulk insert for ``client``'s store, or None when it is not MLflow's SQL store on sqlite."""
        tables = sqlite_metric_tables(client)
        return cls(tables) if tables is not None else None

    def log(self, rows: Iterable[Row]) -> set[str]:
        """Insert ``rows``; returns the run ids skipped because their run is not active
        (deleted), which MLflow's log_batch would refuse too."""
        from sqlalchemy import insert, select, tuple_
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        rows = list(rows)
        run_ids = sorted({r[0] for r in rows})
        t = self.tables
        runs, metrics, lt = t.runs, t.metrics, t.latest_metrics
        with t.write_session() as session:
            conn = session.connection()
            active: set[str] = set()
            for i in range(0, len(run_ids), _CHUNK_RUNS):
                chunk = run_ids[i : i + _CHUNK_RUNS]
                q = select(runs.c.run_uuid).where(runs.c.run_uuid.in_(chunk), runs.c.lifecycle_stage == "active")
                active.update(conn.execute(q).scalars())
            records = []
            latest: dict[tuple[str, str], dict] = {}
            sanitize = t.sanitize_metric_value
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
                conn.execute(insert(metrics).prefix_with("OR IGNORE"), records)
                up = sqlite_insert(lt)
                ex = up.excluded
                up = up.on_conflict_do_update(
                    index_elements=[lt.c.key, lt.c.run_uuid],
                    set_={"value": ex.value, "timestamp": ex.timestamp, "step": ex.step, "is_nan": ex.is_nan},
                    where=tuple_(ex.step, ex.timestamp, ex.value) > tuple_(lt.c.step, lt.c.timestamp, lt.c.value),
                )
                conn.execute(up, list(latest.values()))
        return set(run_ids) - active
