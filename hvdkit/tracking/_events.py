"""Queue items rank 0 hands to the writer that expand into spool events off the training
thread (see SpoolWriter: any queued object with ``events()`` is expanded on the spool thread)."""

from __future__ import annotations

import numpy as np

from hvdkit.tracking import keys


class ChildRows:
    """The child runs' metrics of one gather, turned into ``log_batch`` events off the training
    thread: with 512 ranks, building 512 events on rank 0's training thread would cost it (and,
    through the next collective, every rank) milliseconds per interval."""

    __slots__ = ("rows", "ranks", "ts", "step", "skip", "refs")

    def __init__(self, rows: np.ndarray, ranks: list[int], ts: int, step: int, skip: frozenset[str] = frozenset(),
                 refs: list[str] | None = None) -> None:
        self.rows = rows  # fancy-indexed from the gathered table: a copy, safe to keep
        self.ranks = ranks
        self.ts = ts
        self.step = step
        self.skip = skip
        self.refs = refs or [f"rank{r}" for r in ranks]  # an elastic job's worker runs have refs of their own

    def events(self) -> list[dict]:
        names, ts, step, skip, sparse = keys.RANK_VECTOR, self.ts, self.step, self.skip, keys.SPARSE_RANK_KEYS
        # A sparse key's NaN means "no point this gather" (unchanged since its last point, see
        # JobTracker._thin_sparse, or no system sample: a rank that samples no host); any other
        # key's NaN is a measurement (a diverged loss) and is kept. Most rows have no sparse value
        # at all (the system columns are NaN but on one rank per host), so they are found with one
        # numpy pass rather than a Python test per key and row.
        dense = [i for i, k in enumerate(names) if k not in skip and k not in sparse]
        scols = np.array([i for i, k in enumerate(names) if k not in skip and k in sparse], dtype=np.intp)
        present = ~np.isnan(self.rows[:, scols])
        out = []
        for ref, row, has, mask in zip(self.refs, self.rows.tolist(), present.any(axis=1).tolist(), present):
            metrics = [[names[i], row[i], ts, step] for i in dense]
            if has:
                metrics.extend([names[i], row[i], ts, step] for i in scols[mask].tolist())
            out.append({"op": "log_batch", "ref": ref, "metrics": metrics})
        return out


class Batch:
    """Several gathers' events handed to the writer as one queue item (expanded, like
    ``ChildRows``, on the spool thread), so that they reach the store in one window."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items

    def events(self) -> list[dict]:
        out: list[dict] = []
        for item in self.items:
            if isinstance(item, dict):
                out.append(item)
            else:
                out.extend(item.events())
        return out


__all__ = ["Batch", "ChildRows"]
