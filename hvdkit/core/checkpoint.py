"""Checkpoint policy and atomic files. Rank 0 writes; a reader never sees a torn checkpoint.

A checkpoint is written to a temporary name in the same directory, flushed to disk, then renamed
over the final name: rename within one filesystem is atomic, so a crash leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

_NAME = re.compile(r"^ckpt-e(\d{4,})\.(\w+)$")


class CheckpointPolicy:
    def __init__(self, directory: str | os.PathLike | None, every_epochs: int, ext: str,
                 on_saved: Callable[[Path, dict], None] | None = None) -> None:
        self.dir = Path(directory) if directory else None
        self.every_epochs = every_epochs
        self.ext = ext
        self.on_saved = on_saved  # e.g. JobFolder.record_checkpoint: the manifest learns its sha256

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def due(self, epoch: int, last_epoch: int) -> bool:
        """Save after ``epoch`` (0-based)? Always after the last one."""
        return self.enabled and ((epoch + 1) % self.every_epochs == 0 or epoch == last_epoch)

    def path_for(self, epoch: int) -> Path:
        assert self.dir is not None
        return self.dir / f"ckpt-e{epoch + 1:04d}.{self.ext}"

    def save(self, backend, epoch: int, meta: dict) -> Path:
        """Rank 0: write the checkpoint of ``epoch`` through ``backend`` (atomically), then tell ``on_saved``."""
        path = self.path_for(epoch)
        backend.save_checkpoint(path, meta)
        if self.on_saved is not None:
            self.on_saved(path, meta)
        return path

    def latest(self) -> Path | None:
        if not self.dir or not self.dir.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name)) and m.group(2) == self.ext]
        return max(found)[1] if found else None
