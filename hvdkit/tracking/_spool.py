"""The spool: a job's tracking events, appended to a local file before MLflow sees them.

Layout of one spool directory (one per job)::

    meta.json       format, job id, the store the job meant to write to
    events.jsonl    one event per line, append-only
    artifacts/<n>/  copies of logged files, taken when logged
    state.json      per store: local ref -> MLflow run id, how many events are applied
    .lock           flock'ed by whoever is applying (the job's writer or ``hvdkit sync``)

Events are plain dicts with every value fixed when spooled (timestamps included), so applying
one twice writes the same thing twice::

    {"op": "create_run", "ref": "rank3", "parent_ref": "parent", "parent_run_id": null,
     "experiment": "hvdkit", "run_name": "rank-3", "tags": {...}, "start_time": 1700000000000}
    {"op": "log_batch", "ref": "rank3", "metrics": [[key, value, timestamp_ms, step], ...],
     "params": {...}, "tags": {...}}
    {"op": "log_artifact", "ref": "parent", "path": "artifacts/0/model.pt", "artifact_path": null}
    {"op": "end_run", "ref": "rank3", "status": "FINISHED", "end_time": 1700000100000}
    {"op": "reopen_run", "ref": "parent", "run_id": "..."}   (a resumed job: RUNNING again, ref mapped)

The state is per *store URI*: the same spool can be replayed into another store (the one the
job could not reach, or a local sqlite file) without mixing up run ids.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvdkit._files import atomic_write_json
from hvdkit.errors import TrackingError
from hvdkit.tracking._credentials import is_masked, mask_uri

FORMAT = 1
EVENTS = "events.jsonl"
STATE = "state.json"
META = "meta.json"
LOCK = ".lock"
DEFAULT_ROOT = "hvdkit-spool"

Event = dict[str, Any]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class TargetState:
    """How far one store has been brought up to date with the spool."""

    applied: int = 0  # events fully applied, in file order
    offset: int = 0  # byte offset of the first unapplied event
    runs: dict[str, str] = field(default_factory=dict)  # ref -> run id
    experiments: dict[str, str] = field(default_factory=dict)  # name -> id
    # refs whose create_run may have reached the store without us learning the run id (crash or
    # timeout mid-call): resolved by searching the run's spool_ref tag before creating again.
    creating: list[str] = field(default_factory=list)


class Spool:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.events_path = self.dir / EVENTS
        self._lock_fd: int | None = None
        self._artifact_seq = 0

    # -- creation / opening -------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str] | None, job_id: str, tracking_uri: str, *, name: str | None = None) -> "Spool":
        directory = Path(root or DEFAULT_ROOT) / (name or job_id)
        try:
            directory.mkdir(parents=True, exist_ok=False)
            (directory / EVENTS).touch()
        except FileExistsError:
            raise TrackingError(
                f"spool directory {directory} already exists", fix="use a new job id or another spool_dir"
            ) from None
        except OSError as exc:
            raise TrackingError(
                f"cannot create spool directory {directory}: {exc.strerror}",
                fix="set tracking spool_dir to a writable directory",
            ) from None
        # A password in the URI is masked (user:***@): the spool outlives the job and may be
        # copied around; meta() puts the password back from $MLFLOW_TRACKING_URI when it names
        # the same store.
        atomic_write_json(
            directory / META,
            {"format": FORMAT, "job_id": job_id, "tracking_uri": mask_uri(tracking_uri), "created_ms": now_ms()},
            compact=True,
        )
        return cls(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> "Spool":
        d = Path(directory)
        if not (d / EVENTS).is_file() or not (d / META).is_file():
            hint = sorted(str(p.parent) for p in d.glob(f"*/{EVENTS}"))[:3] if d.is_dir() else []
            fix = f"pass a job's spool directory, e.g. {hint[0]}" if hint else "pass a directory holding events.jsonl"
            raise TrackingError(f"{d} is not an hvdkit spool (no {EVENTS} / {META})", fix=fix)
        spool = cls(d)
        fmt = spool.meta().get("format")
        if fmt != FORMAT:
            raise TrackingError(
                f"spool {d} has format {fmt}, this hvdkit reads format {FORMAT}",
                fix="replay it with the hvdkit version that wrote it",
            )
        return spool

    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.dir / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrackingError(f"cannot read {self.dir / META}: {exc}", fix="check the spool directory") from None
        stored = meta.get("tracking_uri") if isinstance(meta, dict) else None
        current = os.environ.get("MLFLOW_TRACKING_URI", "")
        if isinstance(stored, str) and is_masked(stored) and current and mask_uri(current) == stored:
            meta["tracking_uri"] = current  # the masked store, its password from the environment
        return meta

    # -- lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Exclusive, non-blocking: two appliers would race on the state file."""
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrackingError(
                f"spool {self.dir} is in use (a running job or another hvdkit sync)",
                fix="wait for it to finish, then sync again",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- events -------------------------------------------------------------------------
    def open_append(self):
        return open(self.events_path, "a", encoding="utf-8")

    @staticmethod
    def encode(event: Event) -> str:
        # allow_nan: a diverged loss is data (MLflow stores NaN); Python's json reads it back.
        return json.dumps(event, separators=(",", ":"), allow_nan=True) + "\n"

    def read_from(self, offset: int, max_events: int) -> tuple[list[Event], int]:
        """Complete events starting at byte ``offset``: (events, offset after the last one).

        A final line without its newline is a write in progress (or a job killed mid-write) and is
        left for later; a corrupt line elsewhere is an error, since skipping it would lose data.
        """
        events: list[Event] = []
        with open(self.events_path, "rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    events.append(json.loads(raw))
                except ValueError:
                    raise TrackingError(
                        f"spool {self.events_path} has a corrupt event at byte {pos}",
                        fix="truncate the file before that line, then sync again",
                    ) from None
                pos += len(raw)
                if len(events) >= max_events:
                    break
        return events, pos

    def count_events(self) -> int:
        with open(self.events_path, "rb") as f:
            return sum(1 for raw in f if raw.endswith(b"\n"))

    # -- artifacts ----------------------------------------------------------------------
    def stage_artifact(self, path: str | os.PathLike[str]) -> str:
        """Copy a file or directory into the spool now (so later changes to it do not leak into
        the run) and return its path relative to the spool directory."""
        src = Path(path)
        if not src.exists():
            raise TrackingError(f"artifact {src} does not exist", fix="log a path that exists on rank 0")
        rel = Path("artifacts") / str(self._artifact_seq) / src.name
        self._artifact_seq += 1
        dst = self.dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return rel.as_posix()

    # -- state --------------------------------------------------------------------------
    def load_state(self, target_uri: str) -> TargetState:
        path = self.dir / STATE
        if not path.exists():
            return TargetState()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return TargetState(**data.get("targets", {}).get(mask_uri(target_uri), {}))
        except (OSError, ValueError, TypeError) as exc:
            raise TrackingError(
                f"cannot read spool state {path}: {exc}",
                fix="delete it to replay from scratch (runs already created would be created again)",
            ) from None

    def save_state(self, target_uri: str, state: TargetState) -> None:
        path = self.dir / STATE
        data: dict[str, Any] = {"format": FORMAT, "targets": {}}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
        data.setdefault("targets", {})[mask_uri(target_uri)] = asdict(state)  # keyed without the password
        atomic_write_json(path, data, compact=True)

    def remove(self) -> None:
        self.unlock()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # the root too, once no job's spool is left in it
        except OSError:
            pass
