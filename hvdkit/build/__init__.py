"""Build layer: Horovod 0.28.1 from its sdist with hvdkit's patches, cached as a wheel.

What other layers use from here is public: this package's names, and ``hvdkit.build.env`` (the
environment probes: framework and dist versions, the installed build marker, MPI, CMake).
"""

from hvdkit.build._cache import BuildKey, WheelCache, cache_root
from hvdkit.build._horovod import SUPPORTED_HOROVOD, BuildPlan, BuildResult, build_horovod
from hvdkit.build._patches import PATCHES, SourcePatch, apply_patches

__all__ = [
    "PATCHES",
    "SUPPORTED_HOROVOD",
    "BuildKey",
    "BuildPlan",
    "BuildResult",
    "SourcePatch",
    "WheelCache",
    "apply_patches",
    "build_horovod",
    "cache_root",
]
