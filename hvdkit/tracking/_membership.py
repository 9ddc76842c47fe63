"""Elastic jobs in MLflow: one job, one parent run, whatever its membership does. Framework-free.

Horovod elastic re-enters the training function after every membership change (a worker died,
hosts were added or removed). At each (re)entry every rank, joiners included, calls
:meth:`ElasticTracking.sync` at the same point; it is a collective (one gather of who is here,
one broadcast of rank 0's bookkeeping), after which every rank holds the same record:

* **members**: each worker *process* (a token drawn at process start; its host and local rank)
  with its rank now and the ref of its child run. A worker keeps its child run while it lives,
  whatever rank Horovod renumbers it to (the run's ``hvdkit.rank`` tag follows); a worker that
  joins gets a child run of its own (``rank-<r>``, tags ``hvdkit.worker``, ``hvdkit.joined_step``);
  a worker that leaves has its run ended KILLED (tags ``hvdkit.left_step``, ``hvdkit.left_reason``).
* **membership epochs**: the spans between changes: first and last step, world size, ranks and
  hosts, who joined and left, why (``start``, ``failure``, ``hosts_updated``), the epoch's
  throughput T (mean of its ``samples_per_sec`` gathers, the first left out when there are two or
  more, as for a whole job) and, at the end, its scaling efficiency T / (N · T_1) against an np=1
  baseline (as :mod:`hvdkit.tracking.efficiency` finds one; none: not logged).

What rank 0 writes (see :mod:`hvdkit.tracking.keys`): on the parent, at the step of each change,
``world_size`` (also logged with every gather), ``membership_epoch`` (one point per change: the
event), ``membership_joined`` and ``membership_left``; per epoch, at its first step,
``membership_samples_per_sec`` and ``membership_scaling_efficiency``; tags ``hvdkit.elastic`` and
``hvdkit.membership_changes``; and the whole record as the artifact ``elastic/membership.json``
(rewritten at each change and at the end).

Rank 0 is the writer. Horovod keeps rank 0 on a worker that survived (hosts keep their order,
a blacklisted host comes back at the end), so rank 0 changes process only when rank 0's process
itself died. Then the new rank 0 — a survivor holding the same record — opens a spool of its
own (``<job id>.e<epoch>``) already mapped to the job's runs, ends the lost workers' runs and goes
on: still one parent run. Lost with the old process: what it had not yet spooled (at most
``flush_every_s`` of metrics), and the ids of child runs it created too late for the last
broadcast (those runs stay RUNNING).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hvdkit._rank import from_rank_zero, rank_zero
from hvdkit.errors import TrackingError
from hvdkit.tracking import keys
from hvdkit.tracking._spool import now_ms

log = logging.getLogger("hvdkit.tracking")

_HOST_BYTES = 64
_TOKEN_BYTES = 16
_ROW = _HOST_BYTES + _TOKEN_BYTES + 3  # host | token | local rank (2 bytes) | has-record flag

START, FAILURE, HOSTS_UPDATED = "start", "failure", "hosts_updated"  # as hvdkit.core.elastic


@dataclass(frozen=True)
class Worker:
    """One row of the gather: who holds a rank now."""

    rank: int
    host: str
    token: str
    local_rank: int
    has_record: bool

    @property
    def label(self) -> str:
        return f"{self.host}[{self.local_rank}]#{self.token[:6]}"


def encode_worker(host: str, token: str, local_rank: int, has_record: bool) -> np.ndarray:
    row = np.zeros(_ROW, dtype=np.uint8)
    h = host.encode()[:_HOST_BYTES]
    t = token.encode()[:_TOKEN_BYTES]
    row[: len(h)] = np.frombuffer(h, dtype=np.uint8)
    row[_HOST_BYTES : _HOST_BYTES + len(t)] = np.frombuffer(t, dtype=np.uint8)
    row[_HOST_BYTES + _TOKEN_BYTES] = local_rank & 0xFF
    row[_HOST_BYTES + _TOKEN_BYTES + 1] = (local_rank >> 8) & 0xFF
    row[-1] = 1 if has_record else 0
    return row


def decode_workers(table: Any) -> list[Worker]:
    t = np.asarray(table).astype(np.uint8).reshape(-1, _ROW)
    out = []
    for r, row in enumerate(t):
        text = lambda a: bytes(a).rstrip(b"\0").decode(errors="replace")  # noqa: E731
        lr = int(row[_HOST_BYTES + _TOKEN_BYTES]) | (int(row[_HOST_BYTES + _TOKEN_BYTES + 1]) << 8)
        out.append(Worker(r, text(row[:_HOST_BYTES]), text(row[_HOST_BYTES : _HOST_BYTES + _TOKEN_BYTES]), lr, bool(row[-1])))
    return out


def plan_change(record: Mapping[str, Any], workers: list[Worker], step: int, reason: str, sampling: int,
                now: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Rank 0: the record after a (re)entry with ``workers``, and the change (None: same
    members, e.g. a failure that lost nobody). Pure: the caller broadcasts the result."""
    old = record["members"]
    tokens = {w.token for w in workers}
    left = [m for t, m in old.items() if t not in tokens]
    joined = [w for w in workers if w.token not in old]
    renumbered = [(old[w.token]["ref"], w.rank) for w in workers if w.token in old and old[w.token]["rank"] != w.rank]
    if not left and not joined and not renumbered:
        return dict(record), None
    k = len(record["epochs"])
    members = {}
    for w in workers:
        if w.token in old:
            m = dict(old[w.token], rank=w.rank)
        else:
            ref = f"rank{w.rank}.m{k}" if sampling and w.rank % sampling == 0 else None
            m = {"rank": w.rank, "host": w.host, "local_rank": w.local_rank, "worker": w.label, "ref": ref,
                 "joined_step": step, "joined_epoch": k}
        members[w.token] = m
    epochs = [dict(e) for e in record["epochs"]]
    if epochs and epochs[-1].get("end_step") is None:
        epochs[-1].update(end_step=step, ended_ms=now)
    epochs.append(_epoch(k, step, reason, workers, members, now,
                         joined=[members[w.token]["worker"] for w in joined], left=[m["worker"] for m in left]))
    new = dict(record, members=members, epochs=epochs)
    change = {"epoch": k, "step": step, "reason": reason, "size": len(workers),
              "joined": [members[w.token] for w in joined], "left": left, "renumbered": renumbered}
    return new, change


def _epoch(k: int, step: int, reason: str, workers: list[Worker], members: Mapping[str, Any], now: int,
           joined: list[str], left: list[str]) -> dict[str, Any]:
    return {
        "epoch": k, "start_step": step, "end_step": None, "reason": reason, "size": len(workers),
        "hosts": sorted({w.host for w in workers}), "started_ms": now, "ended_ms": None,
        "ranks": [{"rank": w.rank, "host": w.host, "local_rank": w.local_rank, "worker": members[w.token]["worker"],
                   "run_ref": members[w.token]["ref"]} for w in workers],
        "joined": joined, "left": left, "samples_per_sec": None, "scaling_efficiency": None,
    }


def initial_record(workers: list[Worker], step: int, run_id: str | None, job_id: str | None, sampling: int,
                   now: int) -> dict[str, Any]:
    """The record of a fresh job: epoch 0, each worker on the ``rank<r>`` child run the tracker's
    start created. Every rank computes the same one from the same gather."""
    members = {
        w.token: {"rank": w.rank, "host": w.host, "local_rank": w.local_rank, "worker": w.label,
                  "ref": f"rank{w.rank}" if sampling and w.rank % sampling == 0 else None,
                  "joined_step": step, "joined_epoch": 0}
        for w in workers
    }
    return {"run_id": run_id, "job_id": job_id, "members": members, "runs": {},
            "epochs": [_epoch(0, step, START, workers, members, now, joined=[m["worker"] for m in members.values()], left=[])]}


def _sampling(tracker: Any) -> int:
    return int(getattr(tracker, "_sampling", 1) or 0)


class ElasticTracking:
    """One process's part in an elastic job's tracking; see the module docstring.

    ``gather(vec)`` / ``broadcast_object(obj)``: the backend's collectives (as the tracker's);
    ``params`` / ``tags``: what ``JobTracker.start`` logs when the job's runs are created;
    ``batch_size``: per rank, for an epoch's throughput when it had no gather.
    """

    def __init__(self, tracker: Any, *, gather: Callable[[np.ndarray], Any], broadcast_object: Callable[[Any], Any],
                 params: Mapping[str, Any], tags: Mapping[str, Any], batch_size: int, host: str | None = None) -> None:
        self.tracker = tracker
        self._gather = gather
        self._broadcast = broadcast_object
        self._params = dict(params)
        self._tags = {**tags, keys.TAG_ELASTIC: "true"}
        self._batch = batch_size
        self.host = host or os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        self.token = uuid.uuid4().hex[:_TOKEN_BYTES]
        self.record: dict[str, Any] | None = None  # the same on every rank after each sync
        self._hist0 = 0  # rank 0: index into the tracker's samples_per_sec history where this epoch began
        self._epoch_t0 = time.monotonic()
        self._epoch_step0 = 0
        # Elastic jobs log efficiency per membership epoch (close()); the tracker's own, over a
        # history of mixed world sizes against the last size, would mean nothing.
        tracker.config.log_efficiency = False

    @property
    def changes(self) -> int:
        return len(self.record["epochs"]) - 1 if self.record else 0

    # -- the collective --------------------------------------------------------------------
    def sync(self, step: int, reason: str, rank: int, size: int, local_rank: int) -> None:
        """Every rank, at every (re)entry, right after Horovod's state sync."""
        from hvdkit.tracking._job import World

        table = np.asarray(self._gather(encode_worker(self.host, self.token, local_rank, self.record is not None)))
        workers = decode_workers(table)
        if len(workers) != size:
            raise TrackingError(f"membership gather returned {len(workers)} rows for {size} ranks", fix="report this as a bug")
        hostnames = [w.host for w in workers]
        world = World(rank=rank, size=size, local_rank=local_rank, local_size=hostnames.count(self.host), hostnames=hostnames)
        payload = from_rank_zero(rank, self._broadcast, self._plan, step, reason, workers)
        if payload.get("error"):
            raise TrackingError(payload["error"])
        tracker = self.tracker
        if payload.get("fresh"):
            tracker.membership_changed(world, step, None)
            tracker.start(self._params, self._tags)  # a collective: creates the runs on rank 0
            self.record = initial_record(workers, step, tracker.run_id, tracker.job_id, _sampling(tracker), now_ms())
            self._begin_epoch(step)
            rank_zero(rank, self._emit_start, step)
            return
        record = payload["record"]
        if tracker.run_id is None:  # a joiner: the runs exist, rank 0 writes them
            tracker.adopt(record["run_id"], record["job_id"])
        self.record = record
        refs = {m["rank"]: m["ref"] for m in record["members"].values() if m["ref"]}
        tracker.membership_changed(world, step, refs)
        change = payload.get("change")
        if change is not None:
            self._begin_epoch(step)
        if change is not None:
            rank_zero(rank, self._emit_change, change)

    def _plan(self, step: int, reason: str, workers: list[Worker]) -> dict[str, Any]:
        """Rank 0: what every rank adopts (broadcast by the caller). Never raises: an error is
        broadcast, so every rank fails alike instead of the others hanging in the broadcast."""
        try:
            if self.record is None:
                if any(w.has_record for w in workers):
                    raise TrackingError("rank 0 of this elastic job is a new worker while others hold the job's record "
                                        "(Horovod assigned rank 0 to a joiner)",
                                        fix="resume the job: hvdkit run --resume last")
                return {"fresh": True}
            record, change = plan_change(self.record, workers, step, reason, _sampling(self.tracker), now_ms())
            if change is not None and len(record["epochs"]) >= 2:
                record["epochs"][-2]["samples_per_sec"] = self._epoch_throughput(record["epochs"][-2], step)
            record["runs"] = {**record.get("runs", {}), **self._run_ids()}
            if self._parent_tags_known():
                record["parent_tags"] = dict(self.tracker._parent_tags)
            if not self._is_writer():
                self._take_over_writer(record, change)
            return {"record": record, "change": change}
        except TrackingError as exc:
            return {"error": exc.one_line()}
        except Exception as exc:  # noqa: BLE001 - shared as one line; the other ranks raise it too
            log.exception("elastic membership bookkeeping failed on rank 0")
            return {"error": f"elastic membership bookkeeping failed on rank 0: {type(exc).__name__}: {exc}"}

    # -- rank 0: epochs ------------------------------------------------------------------------
    def _begin_epoch(self, step: int) -> None:
        self._hist0 = len(getattr(self.tracker, "_history", []))
        self._epoch_t0 = time.monotonic()
        self._epoch_step0 = step

    def _epoch_throughput(self, epoch: Mapping[str, Any], step: int) -> float | None:
        """Rank 0: T of ``epoch`` (the current one) ending at ``step``: its gathers' mean, or
        without a gather the wall clock since it began on this process."""
        from hvdkit.tracking.efficiency import history_throughput

        if step <= epoch["start_step"]:
            return None
        t = history_throughput(list(getattr(self.tracker, "_history", []))[self._hist0 :])
        if t is None and self._epoch_step0 == epoch["start_step"]:
            seconds = time.monotonic() - self._epoch_t0
            t = (step - epoch["start_step"]) * epoch["size"] * self._batch / seconds if seconds > 0 else None
        return t

    def close(self, step: int, status: str) -> None:
        """Rank 0, once training ended (after the last gather): the last epoch's end and T, each
        epoch's scaling efficiency (FINISHED only), the final record as an artifact."""
        if self.record is None or self.tracker.world.rank != 0:
            return
        epochs = self.record["epochs"]
        if epochs and epochs[-1].get("end_step") is None:
            epochs[-1].update(end_step=step, ended_ms=now_ms(), samples_per_sec=self._epoch_throughput(epochs[-1], step))
        ts = now_ms()
        metrics = []
        last = epochs[-1] if epochs else None
        if last is not None and last["samples_per_sec"] is not None:
            metrics.append([keys.MEMBERSHIP_SAMPLES_PER_SEC, float(last["samples_per_sec"]), ts, last["start_step"]])
        tags: dict[str, str] = {}
        if status == "FINISHED":
            base = self._baseline()
            if base is not None:
                run_id, t1 = base
                tags[keys.TAG_BASELINE_RUN_ID] = run_id
                for e in epochs:
                    if e["samples_per_sec"] is not None and t1 > 0:
                        e["scaling_efficiency"] = float(e["samples_per_sec"]) / (e["size"] * t1)
                        metrics.append([keys.MEMBERSHIP_SCALING_EFFICIENCY, e["scaling_efficiency"], ts, e["start_step"]])
        self.tracker.submit_events([{"op": "log_batch", "ref": "parent", "metrics": metrics, "tags": tags}])
        self._log_record()

    def _baseline(self) -> tuple[str, float] | None:
        """(run id, T_1) of the np=1 baseline: --baseline's, else the latest matching np=1 run."""
        tracker = self.tracker
        base = getattr(tracker, "_baseline", None)
        if base is not None:
            return base.run_id, base.samples_per_sec
        if tracker.config.baseline_run_id or not getattr(tracker._writer, "healthy", False):
            return None
        from hvdkit.tracking._runs import matching_baseline

        tags = getattr(tracker, "_parent_tags", {}) or {}  # their host_type names the accelerator too
        try:
            found = matching_baseline(tracker.config, tags)
        except Exception as exc:  # noqa: BLE001 - a lookup failure must not fail a finished job
            log.warning("np=1 baseline lookup failed (%s): membership_scaling_efficiency not logged", exc)
            return None
        if not found:
            print("no np=1 baseline: membership_scaling_efficiency not logged", file=sys.stderr, flush=True)
            return None
        return found.run_id, found.samples_per_sec

    # -- rank 0: events ------------------------------------------------------------------------
    def _emit_start(self, step: int) -> None:
        assert self.record is not None
        ts = now_ms()
        size = self.tracker.world.size
        events = [{"op": "log_batch", "ref": "parent",
                   "metrics": [[keys.WORLD_SIZE, float(size), ts, step], [keys.MEMBERSHIP_EPOCH, 0.0, ts, step],
                               [keys.MEMBERSHIP_JOINED, float(size), ts, step], [keys.MEMBERSHIP_LEFT, 0.0, ts, step]],
                   "tags": {keys.TAG_MEMBERSHIP_CHANGES: "0"}}]
        for m in self.record["members"].values():
            if m["ref"]:
                events.append({"op": "log_batch", "ref": m["ref"], "metrics": [],
                               "tags": {keys.TAG_WORKER: m["worker"], keys.TAG_JOINED_STEP: str(step)}})
        self.tracker.submit_events(events)
        self._log_record()

    def _emit_change(self, change: Mapping[str, Any]) -> None:
        assert self.record is not None
        tracker = self.tracker
        ts = now_ms()
        step, k = change["step"], change["epoch"]
        events: list[dict[str, Any]] = []
        previous = self.record["epochs"][k - 1] if k >= 1 else None
        if previous is not None and previous.get("samples_per_sec") is not None:
            events.append({"op": "log_batch", "ref": "parent", "metrics": [
                [keys.MEMBERSHIP_SAMPLES_PER_SEC, float(previous["samples_per_sec"]), ts, previous["start_step"]]]})
        why = "failure" if change["reason"] == FAILURE else "removed"
        for m in change["left"]:
            if m["ref"]:
                events.append({"op": "log_batch", "ref": m["ref"], "metrics": [],
                               "tags": {keys.TAG_LEFT_STEP: str(step), keys.TAG_LEFT_REASON: why}})
                events.append({"op": "end_run", "ref": m["ref"], "status": "KILLED", "end_time": ts})
        parent_tags = getattr(tracker, "_parent_tags", {}) or {}
        inherited = {t: parent_tags[t] for t in (keys.TAG_RECIPE, keys.TAG_FRAMEWORK, keys.TAG_BATCH_SIZE,
                                                  keys.TAG_HOST_TYPE, keys.TAG_JOB_ID, keys.TAG_ELASTIC) if t in parent_tags}
        for m in change["joined"]:
            if not m["ref"]:
                continue
            child = {**inherited, keys.TAG_ROLE: keys.ROLE_RANK, keys.TAG_RANK: str(m["rank"]),
                     keys.TAG_LOCAL_RANK: str(m["local_rank"]), keys.TAG_WORLD_SIZE: str(change["size"]),
                     keys.TAG_WORKER: m["worker"], keys.TAG_JOINED_STEP: str(step)}
            if m["host"]:
                child[keys.TAG_HOST] = m["host"]
            if tracker.job_id:
                child[keys.TAG_JOB_ID] = str(tracker.job_id)  # the parent's tags may not carry it
            events.append({"op": "create_run", "ref": m["ref"], "parent_ref": "parent", "parent_run_id": None,
                           "experiment": tracker.config.experiment, "run_name": f"rank-{m['rank']}", "tags": child,
                           "start_time": ts})
        for ref, rank in change["renumbered"]:
            if ref:
                events.append({"op": "log_batch", "ref": ref, "metrics": [], "tags": {keys.TAG_RANK: str(rank)}})
        hosts = ",".join(dict.fromkeys(tracker.world.hostnames))
        events.append({"op": "log_batch", "ref": "parent", "metrics": [
            [keys.WORLD_SIZE, float(change["size"]), ts, step], [keys.MEMBERSHIP_EPOCH, float(k), ts, step],
            [keys.MEMBERSHIP_JOINED, float(len(change["joined"])), ts, step],
            [keys.MEMBERSHIP_LEFT, float(len(change["left"])), ts, step]],
            "tags": {keys.TAG_MEMBERSHIP_CHANGES: str(k), **({keys.TAG_HOSTS: hosts} if hosts else {})}})
        tracker.submit_events(events)
        self._log_record()
        print(f"hvdkit: membership epoch {k} at step {step}: {change['size']} ranks ({change['reason']}; "
              f"joined {[m['worker'] for m in change['joined']]}, left {[m['worker'] for m in change['left']]})",
              file=sys.stderr, flush=True)

    def _log_record(self) -> None:
        """The whole record as ``elastic/membership.json`` on the parent (rank 0; spooled now)."""
        if self.record is None:
            return
        with tempfile.TemporaryDirectory(prefix="hvdkit-membership-") as d:
            path = Path(d) / Path(keys.MEMBERSHIP_ARTIFACT).name
            doc = {k: v for k, v in self.record.items() if k != "parent_tags"}
            path.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
            self.tracker.log_artifact(path, str(Path(keys.MEMBERSHIP_ARTIFACT).parent))

    # -- rank 0 changing process ---------------------------------------------------------------
    def _is_writer(self) -> bool:
        return getattr(self.tracker._writer, "spool", None) is not None

    def _run_ids(self) -> dict[str, str]:
        return dict(getattr(self.tracker._writer, "run_ids", {}) or {})

    def _parent_tags_known(self) -> bool:
        return bool(getattr(self.tracker, "_parent_tags", None))

    def _take_over_writer(self, record: dict[str, Any], change: dict[str, Any] | None) -> None:
        """This survivor became rank 0 because rank 0's process died: open a spool of its own,
        mapped to the job's runs, and write from here on. The runs' ids: the record's, completed
        from the store (each run's ``hvdkit.spool_ref`` tag names its ref). The lost workers'
        runs are then ended by the change's events like any other departure."""
        from hvdkit.tracking._resume import _bounded, job_runs

        tracker = self.tracker
        job_id = record.get("job_id")
        runs = dict(record.get("runs") or {})
        if record.get("run_id"):
            runs.setdefault("parent", record["run_id"])

        def lookup() -> dict[str, str]:
            found = {}
            for run in job_runs(tracker._client(), tracker.config.experiment, str(job_id)):
                ref = run.data.tags.get(keys.TAG_SPOOL_REF, "")
                if ref.startswith(f"{job_id}/"):
                    found[ref.split("/", 1)[1]] = run.info.run_id
            return found

        try:
            runs = {**_bounded(lookup, 20.0, f"finding the runs of job {job_id}"), **runs}
        except TrackingError as exc:
            log.warning("%s; going on with the run ids rank 0 had shared", exc.one_line())
        if "parent" not in runs:
            raise TrackingError("rank 0's process died and the job's parent run id is unknown here",
                                fix=f"resume the job: hvdkit run --resume {job_id or 'last'}")
        resumes = int(getattr(tracker.config, "resumes", 0) or 0)
        # The old rank 0 shares its parent tags from the first change on; dying before it did,
        # it leaves what every rank can say: the recipe's tags, the machine type, the job id
        # (enough for the np=1 baseline lookup and the joiners' runs).
        from hvdkit.tracking.efficiency import host_type

        accelerator = getattr(tracker.config, "accelerator", None)
        parent_tags = record.get("parent_tags") or {**self._tags, keys.TAG_HOST_TYPE: host_type(accelerator),
                                                    **({keys.TAG_JOB_ID: str(job_id)} if job_id else {})}
        tracker.take_over_writer(runs, f"{job_id}.r{resumes}.e{len(record['epochs']) - 1}", parent_tags)
        record["runs"] = runs
        lost = [m["ref"] for m in (change or {}).get("left", []) if m["ref"] and m["ref"] not in runs]
        if lost:
            log.warning("child runs %s were never recorded in the store; they cannot be ended", lost)
        print(f"hvdkit: rank 0's process was lost; this worker ({self.host}) writes the job's runs from now on "
              f"(spool {getattr(tracker, 'spool_dir', None)})", file=sys.stderr, flush=True)


__all__ = ["ElasticTracking", "Worker", "decode_workers", "encode_worker", "initial_record", "plan_change"]
