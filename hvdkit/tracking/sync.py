"""``hvdkit sync DIR``: replay a job's spool into an MLflow store."""

from __future__ import annotations

import os
from dataclasses import dataclass

from hvdkit.errors import TrackingError
from hvdkit.tracking._apply import Applier, StoreUnavailable
from hvdkit.tracking._spool import Spool
from hvdkit.tracking._uri import absolute_uri, is_remote, resolve_tracking_uri


@dataclass(frozen=True)
class SyncReport:
    applied: int  # events applied by this call
    skipped: int  # events already applied to this store before the call
    runs: dict[str, str]  # local ref ("parent", "rank0", ...) -> MLflow run id
    tracking_uri: str = ""
    dropped: int = 0  # items the store rejected for good (see the warnings logged)


def sync_spool(spool_dir: str | os.PathLike[str], tracking_uri: str | None = None) -> SyncReport:
    """Apply every event of ``spool_dir`` not yet applied to the store.

    The store is ``tracking_uri`` if given, else the one the job was writing to (recorded in the
    spool), else :func:`resolve_tracking_uri`'s default. Safe to run again, or after a sync that
    was interrupted: it resumes where the store's state says, and creates no run twice.
    """
    spool = Spool.open(spool_dir)
    uri = tracking_uri or spool.meta().get("tracking_uri") or resolve_tracking_uri()
    uri = absolute_uri(uri)
    spool.lock()
    try:
        applier = Applier(spool, uri, workers=4 if is_remote(uri) else 1)
        skipped = applier.state.applied
        try:
            while applier.apply_next():
                pass
        except StoreUnavailable as exc:
            raise TrackingError(
                f"MLflow store {uri} failed after {applier.stats.applied} of the "
                f"{spool.count_events() - skipped} pending events: {exc}",
                fix=f"check the store is reachable, then run again: hvdkit sync {spool.dir}",
            ) from None
        return SyncReport(
            applied=applier.stats.applied,
            skipped=skipped,
            runs=dict(applier.state.runs),
            tracking_uri=uri,
            dropped=applier.stats.dropped,
        )
    finally:
        spool.unlock()
