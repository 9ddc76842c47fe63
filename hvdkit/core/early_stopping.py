"""Early stopping on a validation metric, framework-free: the loop and Keras ``fit`` share it.

Every rank evaluates (the metrics are allreduced, so all ranks hold the same numbers), but the
decision is rank 0's and is broadcast: ranks that disagreed on a float comparison would leave one
rank waiting forever on the next collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from hvdkit._rank import from_rank_zero

# The metrics every training path logs at each evaluation (Backend.evaluate).
VALIDATION_METRICS = ("val_loss", "val_accuracy")


class EarlyStopping:
    """``update(metrics)`` after each evaluation; True once ``metric`` has not improved by more than
    ``min_delta`` for ``patience`` evaluations in a row (lower is better for a loss, else higher)."""

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0) -> None:
        self.metric, self.patience, self.min_delta = metric, int(patience), float(min_delta)
        self.lower_is_better = metric.endswith("loss")
        self.best = math.inf if self.lower_is_better else -math.inf
        self.waited = 0

    @classmethod
    def for_recipe(cls, recipe) -> "EarlyStopping | None":
        spec = recipe.early_stopping
        return None if spec.metric is None else cls(spec.metric, spec.patience, spec.min_delta)

    def _improved(self, value: float) -> bool:
        if self.lower_is_better:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: Mapping[str, float]) -> bool:
        value = float(metrics[self.metric])
        if self._improved(value):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        return self.waited >= self.patience

    def decide(self, rank: int, broadcast_object: Callable[[Any], Any], metrics: Mapping[str, float]) -> bool:
        """Rank 0's :meth:`update`, the same answer on every rank (a collective)."""
        stop = self.update(metrics)  # every rank keeps the same counters
        return bool(from_rank_zero(rank, broadcast_object, lambda: stop))

    def reason(self) -> str:
        return (f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} for "
                f"{self.patience} evaluation(s) (best {self.best:.4f})")
