"""A job's identity: its id, its folder, and whether it continues an earlier job. Framework-free.

Every ``hvdkit run`` is one *job*. A job owns a folder under the recipe's ``checkpoint.dir``::

    <checkpoint.dir>/<job id>/
        job.json          the manifest: recipe, np, status, resumes, MLflow run ids, checkpoints' sha256
        ckpt-e0005.pt     checkpoints, written atomically by rank 0

A new job starts fresh in a new folder; only ``--resume JOB_ID | RUN_ID | last`` continues one,
with the same MLflow runs. The launcher checks a resume here before any worker starts (exit 2 on
a finished job, a changed recipe, a corrupt checkpoint); rank 0 of ``hvdkit.train`` checks it
again (plain horovodrun) and keeps the manifest up to date. Nobody else invents a job id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdkit._files import atomic_write_json
from hvdkit._ids import new_job_id, slurm_job_id
from hvdkit.errors import UsageError

MANIFEST = "job.json"
LOCK = ".lock"
_CLAIMED: dict[str, int] = {}  # folder -> lock fd held by this process
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Recipe fields a resume may change, and how. Keys are dotted paths; a path covers its subfields.
# checkpoint.dir is where the job folder is found (it may have moved), not part of the training.
# Fields that do not change what is trained (logging, threads, Horovod's cycle/fusion knobs) may
# always differ; the length of training and evaluation may differ with --force; everything else
# (model, data, batch, optimizer, LR rule, seed, compression...) would make the checkpoint and the
# runs' history describe another training, and is refused.
FREE_FIELDS = ("log", "threads", "horovod.cycle_time_ms", "horovod.fusion_threshold_mb", "checkpoint.dir")
FORCE_FIELDS = ("epochs", "steps", "eval", "checkpoint.every_epochs", "np")
DONE = "FINISHED"


class ResumeError(UsageError):
    """A ``--resume`` that cannot continue (unknown or finished job, changed recipe, bad checkpoint)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a job folder, or None when it has none; a torn or foreign file is an error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"job manifest {path} is unreadable ({exc})",
                          fix="start a new job (drop --resume); the folder's checkpoints cannot be trusted") from None
    if not isinstance(data, dict) or "job_id" not in data:
        raise ResumeError(f"job manifest {path} is not an hvdkit job manifest", fix="start a new job (drop --resume)")
    return data


@dataclass
class JobFolder:
    """Where one job keeps its checkpoints and manifest, and whether this run of it is a resume.

    ``dir`` is None for a recipe without checkpoints (the job still has an id for its runs).
    Rank 0 alone writes the manifest."""

    job_id: str
    dir: Path | None
    resumed: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)  # as read on resume (rank 0)

    @classmethod
    def for_recipe(cls, checkpoint_dir: str | os.PathLike | None, job_id: str, *, resumed: bool = False) -> "JobFolder":
        return cls(job_id, Path(checkpoint_dir) / job_id if checkpoint_dir else None, resumed)

    @classmethod
    def at(cls, directory: str | os.PathLike | None, *, resumed: bool = False) -> "JobFolder":
        """A folder given directly (library use: ``run_training(..., job=JobFolder.at(dir))``)."""
        d = Path(directory) if directory else None
        return cls(d.name if d else new_job_id(), d, resumed)

    @property
    def manifest_path(self) -> Path | None:
        return self.dir / MANIFEST if self.dir else None

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the manifest (rank 0; atomic). A no-op without a folder."""
        if self.dir is None:
            return
        data = read_manifest(self.dir) or {"job_id": self.job_id, "created_ms": _now_ms(), "checkpoints": {}}
        data.update(fields)
        data["updated_ms"] = _now_ms()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / MANIFEST, data)
        except OSError as exc:
            raise UsageError(f"cannot write the job folder {self.dir}: {exc.strerror or exc}",
                             fix="set checkpoint.dir to a writable directory (or checkpoint.dir=null)") from None
        self.manifest = data

    def claim(self) -> None:
        """Rank 0, for the life of its process: an exclusive lock on the folder, so that a
        ``--resume`` of a job that is still running is refused instead of training it twice."""
        if self.dir is None:
            return
        import fcntl

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write the job folder {self.dir}: {exc.strerror or exc}",
                             fix="set checkpoint.dir to a writable directory (or checkpoint.dir=null)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResumeError(f"job {self.job_id} is running now (its folder {self.dir} is locked by another process)",
                              fix="wait for it to end, or stop it first") from None
        _CLAIMED[str(self.dir)] = fd  # kept open: the lock lasts until this process exits

    def check_not_running(self) -> None:
        """The launcher's look at the lock (taken and released at once)."""
        self.claim()
        import fcntl

        fd = _CLAIMED.pop(str(self.dir), None) if self.dir else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def settle(self, status: str) -> None:
        """The launcher's word on how the job ended, with the tracker's rule: a manifest still
        RUNNING (rank 0 was SIGKILLed) takes it, and FAILED overrides the KILLED that rank 0
        records when horovodrun SIGTERMs it after a peer failed."""
        if self.dir is None:
            return
        current = (read_manifest(self.dir) or {}).get("status")
        if current in (None, "RUNNING") or (status == "FAILED" and current == "KILLED"):
            self.update(status=status)

    def record_checkpoint(self, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
        """After rank 0 wrote checkpoint ``path``: its sha256 and meta, so a resume can trust it."""
        if self.dir is None:
            return
        data = read_manifest(self.dir) or {}
        ckpts = dict(data.get("checkpoints") or {})
        ckpts[Path(path).name] = {"sha256": sha256_file(path), **{k: meta[k] for k in ("epoch", "step") if k in meta}}
        self.update(checkpoints=ckpts, last_checkpoint=Path(path).name)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, paths: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in paths)


def recipe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) for every field that differs, free fields left out."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _covered(k, FREE_FIELDS)]


def check_changes(old_recipe: Mapping[str, Any], new_recipe: Mapping[str, Any], old_np: int | None, new_np: int | None,
                  *, force: bool, job_id: str) -> list[tuple[str, Any, Any]]:
    """Raise ResumeError naming the first field that may not change; return the forced changes."""
    changes = recipe_changes(old_recipe, new_recipe)
    if old_np and new_np and old_np != new_np:
        changes.append(("np", old_np, new_np))
    hard = [c for c in changes if not _covered(c[0], FORCE_FIELDS)]
    if hard:
        k, was, now = hard[0]
        raise ResumeError(f"--resume {job_id}: recipe field {k} is {now!r}, the job's checkpoints were trained with {was!r}",
                          fix=f"resume with {k}={json.dumps(was)}, or start a new job (drop --resume)")
    if changes and not force:
        k, was, now = changes[0]
        flag = f"-np {was}" if k == "np" else f"{k}={json.dumps(was)}"
        raise ResumeError(f"--resume {job_id}: {k} is {now!r}, the job ran with {was!r}",
                          fix=f"pass {flag} to continue as it was, or --force to change it")
    return changes


def list_jobs(checkpoint_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Manifests of the jobs under ``checkpoint_dir``, oldest first (unreadable ones skipped)."""
    root = Path(checkpoint_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            try:
                m = read_manifest(d) if d.is_dir() else None
            except ResumeError:
                continue
            if m is not None:
                out.append(m)
    return sorted(out, key=lambda m: (m.get("created_ms", 0), m["job_id"]))


@dataclass(frozen=True)
class ResumePlan:
    folder: JobFolder
    np: int | None  # the job's np (from its manifest)
    changes: tuple[tuple[str, Any, Any], ...] = ()


def resolve_resume(spec: str, recipe: Any, *, np: int | None, force: bool,
                   run_lookup: Any = None) -> ResumePlan:
    """The job ``spec`` (a job id, an MLflow run id of the job, or ``last``) names, checked:
    it exists, it did not finish, its recipe matches ``recipe`` (a pydantic Recipe), its newest
    checkpoint is intact. ``run_lookup(run_id) -> job id | None`` resolves a run id the local
    manifests do not know (e.g. a child run), through the tracking store."""
    ck_dir = recipe.checkpoint.dir
    if not ck_dir:
        raise ResumeError(f"--resume {spec}: recipe {recipe.name!r} writes no checkpoints (checkpoint.dir is unset)",
                          fix="set checkpoint.dir in the recipe for jobs you want to resume")
    jobs = list_jobs(ck_dir)
    if spec == "last":
        mine = [m for m in jobs if (m.get("recipe") or {}).get("name") == recipe.name] or jobs
        if not mine:
            raise ResumeError(f"--resume last: no job of recipe {recipe.name!r} under {ck_dir}",
                              fix="start the job without --resume first")
        manifest = mine[-1]
    else:
        manifest = next((m for m in jobs if spec in (m["job_id"], m.get("parent_run_id"))
                         or spec in (m.get("runs") or {}).values()), None)
        if manifest is None and _RUN_ID.match(spec) and run_lookup is not None:
            job_id = run_lookup(spec)
            manifest = next((m for m in jobs if m["job_id"] == job_id), None) if job_id else None
        if manifest is None:
            if not _JOB_ID.match(spec):
                raise ResumeError(f"--resume {spec!r} is not a job id, an MLflow run id or 'last'",
                                  fix=f"pick one of: {', '.join(m['job_id'] for m in jobs[-3:]) or 'last'}")
            known = ", ".join(m["job_id"] for m in jobs[-3:])
            raise ResumeError(f"--resume {spec}: no job of that id or run id under {ck_dir}",
                              fix=f"pass one of the jobs there ({known})" if known else
                              "start the job without --resume first (or check checkpoint.dir)")
    job_id = manifest["job_id"]
    if manifest.get("status") == DONE:
        raise ResumeError(f"--resume {job_id}: the job FINISHED ({manifest.get('steps', '?')} steps); there is nothing to resume",
                          fix="drop --resume to start a new job")
    old_recipe = manifest.get("recipe") or {}
    changes = check_changes(old_recipe, recipe.model_dump(mode="json"), manifest.get("np"), np,
                            force=force, job_id=job_id)
    folder = JobFolder.for_recipe(ck_dir, job_id, resumed=True)
    folder.manifest = manifest
    if manifest.get("status") == "RUNNING":
        folder.check_not_running()  # RUNNING and unlocked: its rank 0 died without a word
    verify_latest_checkpoint(folder)
    return ResumePlan(folder, manifest.get("np"), tuple(changes))


def verify_latest_checkpoint(folder: JobFolder) -> Path | None:
    """The job's newest checkpoint, checked against the sha256 rank 0 recorded; None if it has none
    (killed before its first checkpoint: the resume starts from step 0 in the same runs)."""
    manifest = folder.manifest or read_manifest(folder.dir) or {}
    name = manifest.get("last_checkpoint")
    if not name:
        return None
    assert folder.dir is not None
    path = folder.dir / name
    want = (manifest.get("checkpoints") or {}).get(name, {}).get("sha256")
    if not path.is_file():
        raise ResumeError(f"--resume {folder.job_id}: checkpoint {path} is missing",
                          fix="restore the file, or start a new job (drop --resume)")
    if want and sha256_file(path) != want:
        raise ResumeError(f"--resume {folder.job_id}: checkpoint {path} is corrupt (sha256 differs from the one recorded when it was written)",
                          fix="restore the file, or start a new job (drop --resume)")
    return path


def slurm_requeue_spec(recipe: Any) -> str | None:
    """Under a Slurm requeue (``SLURM_RESTART_COUNT`` > 0) the job of this Slurm job id, if any:
    a requeued batch script continues the same hvdkit job, and runs, by itself."""
    env = os.environ
    if not env.get("SLURM_JOB_ID") or int(env.get("SLURM_RESTART_COUNT", "0") or 0) < 1 or not recipe.checkpoint.dir:
        return None
    # The manifest's slurm_job_id (rank 0 writes it), or the id slurm_job_id() derived from it
    # (the launcher's id, in case the manifest predates the field).
    own = f"slurm-{env['SLURM_JOB_ID']}"
    for m in reversed(list_jobs(recipe.checkpoint.dir)):
        if m.get("slurm_job_id") == env["SLURM_JOB_ID"] or m["job_id"] == own or m["job_id"].startswith(own + "-"):
            return m["job_id"]
    return None


__all__ = ["DONE", "FORCE_FIELDS", "FREE_FIELDS", "JobFolder", "ResumeError", "ResumePlan", "check_changes", "list_jobs",
           "new_job_id", "read_manifest", "recipe_changes", "resolve_resume", "slurm_job_id", "slurm_requeue_spec", "verify_latest_checkpoint"]
