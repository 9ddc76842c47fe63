"""Atomic files: the one way hvdkit writes a file that someone may read while it is written.

The content goes to a temporary name in the same directory, is flushed to disk, then renamed
over the final name: rename within one filesystem is atomic, so a reader (or a crash) sees the
old file or the new one, never half of one. Framework-free, imports nothing of hvdkit: every
layer may use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, compact: bool = False) -> Path:
    """``data`` as JSON, atomically: indented and key-sorted for people, or ``compact`` for machines."""
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1, sort_keys=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
