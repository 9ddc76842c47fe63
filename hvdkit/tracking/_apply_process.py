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

* parent, once, first: ``{"open": {"spool_dir", "workers", "target", "env", "unset"}}``: the spool,
  the store (the URI may hold a password: it travels here, never on a command line nor in the
  child's environment) and what changed in the environment since the child started;
* parent: ``{"max": 5000}``
* child: any number of ``{"created": [ref, run_id]}`` (relayed at once: ``wait_for_run``), then
  one of ``{"ok": n, "dropped": d, "bulk": b}``, ``{"unavailable": why}``, ``{"error": traceback}``.

The child can start before its job knows the spool (:func:`prestart`, rank 0 at process start):
MLflow's import, seconds of CPU, then overlaps the framework's import and ``hvd.init`` instead of
delaying the first step (docs/benchmarks.md, "The tracked job's start").

Applying is idempotent and the child saves the spool state after each window, so killing it at
any moment (the job ends, the parent dies: the child sees its stdin close) loses nothing: what it
did not apply stays in the spool for ``hvdkit sync``.
"""

from __future__ import annotations

import atexit
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
_EXIT_STATUS_WAIT_S = 5.0  # after the pipe closed: the child is exiting


class ApplyProcessFailed(RuntimeError):
    """The child died, or failed in a way it reported; the spool keeps what it did not apply."""


_prestarted: tuple[subprocess.Popen, dict[str, str]] | None = None


def _spawn() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hvdkit.tracking._apply_process"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def prestart() -> None:
    """Start this process's apply child now, before its spool exists, so that MLflow's import runs
    while the framework loads; the job's writer takes it (:class:`ApplierProcess`). Idempotent. A
    child no writer took (the job failed before its tracker opened) ends at this process's exit."""
    global _prestarted
    if _prestarted is None:
        _prestarted = (_spawn(), dict(os.environ))
        atexit.register(_end_untaken)  # a no-op once a writer took it


def _take_prestarted() -> tuple[subprocess.Popen, dict[str, str]] | None:
    global _prestarted
    taken, _prestarted = _prestarted, None
    if taken is not None and taken[0].poll() is not None:  # it died meanwhile: start another
        taken[0].communicate()  # its pipes closed
        return None
    return taken


def _end_untaken() -> None:
    # It holds nothing yet (no spool, no store): killed, not waited for through MLflow's import.
    untaken = _take_prestarted()
    if untaken is not None:
        untaken[0].kill()
        untaken[0].communicate()  # reaped, its pipes closed


class ApplierProcess:
    """Drives ``python -m hvdkit.tracking._apply_process`` over a spool. Not thread-safe: one caller."""

    def __init__(self, spool, target_uri: str, *, workers: int = 1, on_run_created=None) -> None:
        self.stats = ApplyStats()
        self._on_run_created = on_run_created
        from hvdkit.tracking import _sqlfast

        self._bulk = _sqlfast.enabled()  # until the child reports (the opt-in may fall back there)
        self._proc, env_at_start = _take_prestarted() or (_spawn(), dict(os.environ))
        try:  # niced from here, not in the child: a fresh child's imports run niced too
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + NICE)
        except OSError:
            pass
        # What the child lacks: the target (it may hold a password: never on a command line nor in
        # an environment) and what this process set since the child started (MLflow's HTTP
        # settings the writer chose, the credentials file MLflow is pointed at).
        env = {k: v for k, v in os.environ.items() if env_at_start.get(k) != v}
        unset = [k for k in env_at_start if k not in os.environ]
        opening = {"spool_dir": str(spool.dir), "workers": workers, "target": target_uri, "env": env, "unset": unset}
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"open": opening}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the child is gone: the first apply_next reports it

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
    import hvdkit.tracking._apply  # noqa: F401 - MLflow's import: the part worth starting early

    line = sys.stdin.readline()
    if not line:  # no writer took this child (a prestarted one whose job did not track)
        return 0
    opening = json.loads(line)["open"]
    for name in opening["unset"]:
        os.environ.pop(name, None)
    os.environ.update(opening["env"])
    return _serve(opening["spool_dir"], int(opening["workers"]), opening["target"], sys.stdin, proto)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
