"""The Horovod wheel cache: one wheel per build key, outside the repository.

Layout: ``<cache>/wheels/<key>/<wheel file>`` plus ``<key>/build.json`` (what was built, the
wheel's sha256). An entry appears only by an atomic rename of a complete directory, so a build
killed half-way leaves nothing behind that a later run could mistake for a wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from hvdkit.errors import CacheError

BUILD_JSON = "build.json"


def cache_root() -> Path:
    """``$HVDKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/hvdkit``, else ``~/.cache/hvdkit``."""
    if os.environ.get("HVDKIT_CACHE_DIR"):
        return Path(os.environ["HVDKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hvdkit"


@dataclass(frozen=True)
class BuildKey:
    """Everything a Horovod binary is tied to: change one and the wheel must be rebuilt."""

    horovod: str
    python: str  # e.g. "cp311"
    torch: str | None
    tensorflow: str | None
    gpu: bool
    mpi: bool
    patches: str = ""  # digest of the patch set, so a changed patch never reuses an old wheel

    @classmethod
    def for_python(cls, **kw) -> "BuildKey":
        return cls(python=f"cp{sys.version_info.major}{sys.version_info.minor}", **kw)

    def slug(self) -> str:
        def part(name: str, version: str | None) -> str:
            return f"{name}{_clean(version)}" if version else f"no{name}"

        fields = [
            f"horovod{_clean(self.horovod)}",
            self.python,
            part("torch", self.torch),
            part("tf", self.tensorflow),
            "gpu" if self.gpu else "cpu",
            "mpi" if self.mpi else "nompi",
        ]
        if self.patches:
            fields.append(f"p{self.patches[:8]}")
        return "-".join(fields)


def _clean(version: str) -> str:
    # "2.13.0+cpu" -> "2.13.0_cpu": keeps the local tag (a CUDA torch is another ABI) but is path-safe
    return re.sub(r"[^0-9A-Za-z.]+", "_", version)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CachedWheel:
    key: BuildKey
    wheel: Path
    sha256: str


class WheelCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else cache_root()
        self.wheels = self.root / "wheels"

    def entry_dir(self, key: BuildKey) -> Path:
        return self.wheels / key.slug()

    def lookup(self, key: BuildKey) -> CachedWheel | None:
        """The verified wheel for ``key``, None on a miss.

        A corrupted entry is removed (so the cache stays consistent) and reported as a
        :class:`CacheError`: silently rebuilding would hide a disk or copy problem.
        """
        entry = self.entry_dir(key)
        if not entry.exists():
            return None
        try:
            meta = json.loads((entry / BUILD_JSON).read_text())
            wheel = entry / meta["wheel"]
            problem = _verify(wheel, meta["sha256"])
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable cache metadata ({exc})"
            wheel = entry
        if problem:
            shutil.rmtree(entry, ignore_errors=True)
            raise CacheError(
                f"cached Horovod wheel {wheel} is corrupted: {problem}; the entry was removed",
                fix="run `hvdkit build-horovod` again to rebuild it",
            )
        return CachedWheel(key=key, wheel=wheel, sha256=meta["sha256"])

    def store(self, key: BuildKey, built_wheel: Path) -> CachedWheel:
        """Copy ``built_wheel`` into the cache atomically and return the entry."""
        problem = _verify(built_wheel, None)
        if problem:
            raise CacheError(f"freshly built wheel {built_wheel} is unusable: {problem}", fix="rebuild with --verbose to see the build log")
        self.wheels.mkdir(parents=True, exist_ok=True)
        final = self.entry_dir(key)
        staging = self.wheels / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        wheel = staging / built_wheel.name
        shutil.copy2(built_wheel, wheel)
        digest = sha256_of(wheel)
        meta = {"wheel": wheel.name, "sha256": digest, "key": asdict(key)}
        (staging / BUILD_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return CachedWheel(key=key, wheel=final / wheel.name, sha256=digest)

    def clean_stale_staging(self) -> None:
        """Remove staging directories left by builds that were killed."""
        if self.wheels.exists():
            for p in self.wheels.glob(".*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)


def _verify(wheel: Path, sha256: str | None) -> str | None:
    if not wheel.is_file():
        return "the wheel file is missing"
    if sha256 is not None and sha256_of(wheel) != sha256:
        return "its sha256 does not match the one recorded at build time"
    try:
        with zipfile.ZipFile(wheel) as zf:
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        return f"not a valid wheel archive ({exc})"
    if bad is not None:
        return f"archive member {bad} fails its CRC check"
    return None
