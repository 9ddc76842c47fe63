"""Horovod knobs a recipe carries (``horovod.cycle_time_ms``, ``horovod.fusion_threshold_mb``).

Horovod reads them from the environment once, in ``hvd.init()``; horovodrun's flags set the same
variables. So the recipe's values are applied as defaults just before ``hvd.init()``: a flag or
a variable the user set still wins, and a plain ``horovodrun python -m hvdkit.train`` gets them too.
"""

from __future__ import annotations

import os

from hvdkit.recipe import Recipe


def apply_horovod_knobs(recipe: Recipe, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the recipe's HOROVOD_* defaults in ``environ`` (``os.environ``) where unset; return those set."""
    env = os.environ if environ is None else environ
    applied = {}
    for key, value in recipe.horovod.env_defaults().items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied
