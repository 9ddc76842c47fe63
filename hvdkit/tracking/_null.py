"""Tracking disabled: a tracker with JobTracker's methods that does nothing and calls no collective."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the writer imports MLflow; a disabled tracker never needs it
    from hvdkit.tracking._writer import CloseReport


class NullJobTracker:
    """Tracking disabled: the same methods, doing nothing, calling no collective."""

    run_id: str | None = None
    job_id: str | None = None
    spool_dir: str | None = None
    close_report: CloseReport | None = None

    def start(self, params: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
        pass

    def record_step(self, step: int, **_: float) -> None:
        pass

    def set_model_size(self, parameters: int) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def throughput(self) -> float | None:
        return None

    def run_ids(self) -> dict[str, str]:
        return {}

    def flush_interval(self) -> None:
        pass

    def __enter__(self) -> "NullJobTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


__all__ = ["NullJobTracker"]
