"""The applier in a process of its own: MLflow's CPU work off the training process.

Why: on a fast step (a few ms), rank 0's apply thread costs training more than its CPU time.
MLflow's public ``log_batch`` into sqlite spends ~5.5 ms of Python per call plus ~100 µs per
value, all of it holding the GIL that rank 0's training thread needs between its collectives.
Measured (np=2 on 2 cores, digits MLP, paired blocks): tracked / untracked 0.78 with the apply
thread, 0.93 with applying deferred to the end of the job. A child process takes no GIL from training,
and it runs at the lowest CPU priority (``nice`` 19), so where cores are short it catches up when
training waits or at the job's end (``SpoolWriter.close``), and where they are not it keeps the
store current as the thread did.

:class:`ApplierProcess` has :class:`~hvdkit.tracking._apply.Applier`'s interface (``apply_next``,
``stats``, ``bulk_metrics``), so ``SpoolWriter`` drives it the same way. One request at a time over
the child's stdin/stdout, JSON lines:

* parent: ``{"max": 5000}``
* child: any number of ``{"created": [ref, run_id]}`` (relayed at once: ``wait_for_run``), then
  one of ``{"ok": n, "dropped": d, "bulk": b}``, ``{"unavailable": why}``, ``{"error": traceback}``.

Applying is idempotent and the child saves the spool state after each window, so killing it at
any moment (the job ends, the parent dies: the child sees its stdin close) loses nothing: what it
did not apply stays in the spool for ``hvdkit sync``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import IO, Any

from hvdkit.tracking._apply_outcome import ApplyStats, StoreUnavailable

# The lowest priority: on a host whose cores all train (np=2 on 2 cores here) the child runs when a
# rank waits and catches up at the job's end; on a host with a spare core it keeps the store current.
# Measured, paired blocks of the fast-step digits job (hvdkit / none, median per job, mean of 3+
# jobs): apply thread 0.814; this process at nice 10: 0.848, at nice 19: 0.88; SCHED_IDLE was no
# better than nice 19 (0.910 against 0.901, alternated) and can starve the store (docs/benchmarks.md).
NICE = 19
_ENV_TARGET = "HVDKIT_APPLY_TARGET_URI"
_EXIT_STATUS_WAIT_S = 5.0  # after the pipe closed: the child is exiting


class ApplyProcessFailed(RuntimeError):
    """The child died, or failed in a way it reported; the spool keeps what it did not apply."""


class ApplierProcess:
    """Drives ``python -m hvdkit.tracking._apply_process`` over a spool. Not thread-safe: one caller."""

    def __init__(self, spool, target_uri: str, *, workers: int = 1, on_run_created=None) -> None:
        self.stats = ApplyStats()
        self._on_run_created = on_run_created
        from hvdkit.tracking import _sqlfast

        self._bulk = _sqlfast.enabled()  # until the child reports (the opt-in may fall back there)
        # The child inherits this process's environment as it is now (MLflow's HTTP settings the
        # writer set, the credentials); the target URI, which may hold a password, goes the same
        # way, never on a command line.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hvdkit.tracking._apply_process", str(spool.dir), str(workers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, _ENV_TARGET: target_uri},
        )
        try:  # from here, not in the child: its imports (MLflow's take seconds of CPU) run niced too
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
        except OSError:
            pass

    @property
    def bulk_metrics(self) -> bool:
        return self._bulk

    @property
    def pid(self) -> int:
        return self._proc.pid

    def apply_next(self, max_events: int = 5000) -> int:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps({"max": max_events}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise ApplyProcessFailed(self._gone()) from None
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise ApplyProcessFailed(self._gone())
            msg = json.loads(line)
            if "created" in msg:
                ref, run_id = msg["created"]
                if self._on_run_created is not None:
                    self._on_run_created(ref, run_id)
                continue
            if "ok" in msg:
                self.stats.applied += msg["ok"]
                self.stats.dropped = msg["dropped"]
                self._bulk = msg["bulk"]
                return int(msg["ok"])
            if "unavailable" in msg:
                raise StoreUnavailable(msg["unavailable"])
            raise ApplyProcessFailed(f"the apply process failed:\n{msg.get('error', msg)}")

    def close(self, timeout: float = 1.0) -> None:
        """End the child: asked first (stdin closes), killed if it is still inside a store call."""
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # idempotent applying: a window cut short is redone by hvdkit sync
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _gone(self) -> str:
        # The pipe reads EOF a moment before the kernel has the exit status: wait for it, bounded.
        try:
            rc: int | None = self._proc.wait(_EXIT_STATUS_WAIT_S)
        except subprocess.TimeoutExpired:
            rc = None
        return f"the apply process (pid {self._proc.pid}) exited" + (f" with code {rc}" if rc is not None else "")


def _serve(spool_dir: str, workers: int, target_uri: str, inp: IO[str], out: IO[str]) -> int:
    import traceback

    from hvdkit.tracking._apply import Applier
    from hvdkit.tracking._spool import Spool

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    applier = Applier(Spool(spool_dir), target_uri, workers=workers,
                      on_run_created=lambda ref, run_id: send({"created": [ref, run_id]}))
    for line in inp:  # EOF: the writer closed (or its process died)
        req = json.loads(line)
        try:
            n = applier.apply_next(int(req.get("max", 5000)))
        except StoreUnavailable as exc:
            send({"unavailable": str(exc)})
            continue
        except Exception:  # noqa: BLE001 - reported to the writer, which logs it and stops applying
            send({"error": traceback.format_exc()})
            continue
        send({"ok": n, "dropped": applier.stats.dropped, "bulk": applier.bulk_metrics})
    return 0


def main(argv: list[str]) -> int:
    import logging
    import signal

    # Ctrl-C reaches the whole process group: the writer decides when applying ends, not the key.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol gets stdout's pipe to itself: anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    target = os.environ.pop(_ENV_TARGET)
    return _serve(argv[0], int(argv[1]), target, sys.stdin, proto)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
