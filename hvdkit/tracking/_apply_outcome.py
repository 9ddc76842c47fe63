"""What applying a spool reports, importable without MLflow.

The writer and the apply process name these on every rank 0; only the code that talks to a store
(``_apply.Applier``) imports MLflow, so a rank that trains does not pay MLflow's import before its
first step (docs/testing.md: a rank's start).
"""

from __future__ import annotations

from dataclasses import dataclass


class StoreUnavailable(Exception):
    """The store failed in a way a later retry may not; the cursor was not advanced."""


@dataclass
class ApplyStats:
    applied: int = 0  # events applied by this applier
    dropped: int = 0  # items a store rejected for good (logged once each kind)
