"""The one exception tree of hvdkit.

Every error a user can cause says what is wrong *and* how to fix it, in one line.
The CLI turns an :class:`HvdkitError` into that line on stderr and ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HvdkitError(Exception):
    """Base of every error hvdkit raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} — fix: {self.fix}" if self.fix else self.message


class UsageError(HvdkitError):
    """Bad input from the user: a recipe, an option, an override. Nothing was started."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe file or override that does not validate."""


class ParallelError(RecipeError):
    """A model-parallel layout that cannot split this job or this model (``parallel.model``)."""


class LaunchError(UsageError):
    """A launch that cannot work (hosts, slots, controller, framework not built in)."""


class FrameworkMissingError(UsageError):
    """A framework (or Horovod's layer for it) is not importable; the fix names the install."""


class BuildError(HvdkitError):
    """Building or installing Horovod failed."""

    exit_code = 2


class PatchError(BuildError):
    """A shipped source patch no longer applies to the Horovod sources."""


class CacheError(BuildError):
    """The wheel cache holds something unusable (e.g. a corrupted wheel)."""


class TrackingError(HvdkitError):
    """Tracking cannot do what was asked (unknown baseline run, bad spool...)."""

    exit_code = 2


__all__ = [
    "BuildError",
    "CacheError",
    "FrameworkMissingError",
    "HvdkitError",
    "LaunchError",
    "ParallelError",
    "PatchError",
    "RecipeError",
    "TrackingError",
    "UsageError",
]
