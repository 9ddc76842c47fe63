"""Rank gating in one style (the role of Lightning's ``rank_zero_only``), below every layer.

Work only rank 0 does goes through :func:`rank_zero` (a call) or :func:`rank_zero_only` (a
decorator, applied once the rank is known); a decision rank 0 makes for every rank goes through
:func:`from_rank_zero` (rank 0 computes, one broadcast hands it to all). Callers do not branch on
the rank themselves, and collectives, which every rank must run, stay outside what is gated.
The one place that tests the rank itself is the job tracker (``hvdkit/tracking/_tracker.py``):
every rank calls its methods, and its world (rank 0 included) may change under Horovod elastic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def rank_zero(rank: int, fn: Callable[..., T], *args: Any, default: T | None = None, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0; ``default`` elsewhere (pass a no-op object with the
    same interface, e.g. ``NullWriter()``, to spare callers a None check)."""
    return fn(*args, **kwargs) if rank == 0 else default


def rank_zero_only(rank: int) -> Callable[[F], F]:
    """Decorator: the function runs on rank 0 and returns None elsewhere."""

    def deco(fn: F) -> F:
        if rank == 0:
            return fn

        @functools.wraps(fn)
        def noop(*args: Any, **kwargs: Any) -> None:
            return None

        return noop  # type: ignore[return-value]

    return deco


def from_rank_zero(rank: int, broadcast_object: Callable[[Any], T], fn: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` computed on rank 0 and broadcast: every rank returns rank 0's value.
    A collective: every rank must call it, in the same order."""
    return broadcast_object(fn(*args, **kwargs) if rank == 0 else None)
