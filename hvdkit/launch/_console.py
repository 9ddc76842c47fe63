"""The console between horovodrun and the user's terminal, and rank 0's side of its progress protocol.

horovodrun prints every rank's every line behind ``[r]<stdout>:`` / ``[r]<stderr>:`` and flushes
on each ``\\r``, so rank 0's tqdm bar arrives as redraws glued onto one line and N ranks' chatter
drowns it. The launcher pipes horovodrun's output through :class:`Relay`: rank 0's lines without
their prefix, another rank's only when they matter (warnings, errors, tracebacks; its rank named),
rank 0's progress as one bar the launcher draws from :data:`PROGRESS_PREFIX` lines. Every raw line
of every rank also goes to a log file, so nothing hidden is lost.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import selectors
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Set by the launcher for the ranks it starts: rank 0 then prints protocol lines instead of a tqdm
# bar. Under plain horovodrun nobody reads them, so the variable is absent and tqdm stays.
PROGRESS_ENV = "HVDKIT_PROGRESS"
PROGRESS_PREFIX = "@hvdkit:progress "
LOG_DIR_ENV = "HVDKIT_LOG_DIR"  # where the raw logs go (default: <XDG cache>/hvdkit/logs)
LOG_MAX_BYTES = 64 << 20  # per job: a runaway rank must not fill the disk
LOGS_KEPT = 50  # the newest logs stay, older ones are removed when a job starts
DRAIN_S = 3.0  # after horovodrun exits: how long a grandchild holding the pipe may keep the relay alive

# horovodrun (Gloo): "[0]<stdout>:"; mpirun --tag-output: "[1,0]<stdout>:" (job, rank); either may
# follow a timestamp (--prefix-output-with-timestamp).
_PREFIX = re.compile(r"^(?:[^\[\n]*?)\[(\d+)(?:,(\d+))?\]<(stdout|stderr)>:")
# What makes another rank's line worth showing. Tracebacks' and warnings' indented lines follow
# a shown line (see _Filter), so only their first line needs to match.
_MATTERS = re.compile(r"(?i)\b(warn(ing)?s?|errors?|exception|traceback|fatal|critical|abort(ed)?|killed|"
                      r"segmentation fault|core dumped|failed|failure)\b|\w+(Error|Exception|Warning)\b")
HVDKIT_PREFIX = "hvdkit: "  # hvdkit's own messages to the user (rank-gated where they are printed)
_CONTINUATION = re.compile(r"^(\s|$)")  # indented: part of the traceback or warning above it
_MAX_CONTINUATION = 200


@dataclass
class Line:
    """One segment of horovodrun's output: ``rank`` None when it had no rank prefix (horovodrun's
    own, or srun's unlabelled tasks), ``end`` its terminator ("\\n", "\\r" or "" at EOF)."""

    rank: int | None
    stream: str  # stdout | stderr
    text: str
    end: str


def parse_line(raw: str, stream: str) -> Line:
    """Split horovodrun's rank prefix off one segment (terminator included, if any)."""
    end = raw[-1] if raw[-1:] in ("\n", "\r") else ""
    body = raw[:-1] if end else raw
    m = _PREFIX.match(body)
    if m is None:
        return Line(None, stream, body, end)
    rank = int(m.group(2) if m.group(2) is not None else m.group(1))
    return Line(rank, m.group(3), body[m.end():], end)


def parse_progress(text: str) -> dict[str, Any] | None:
    """A protocol line's fields (``n``, ``total``, ``postfix``, ``closed``), None if it is not one."""
    if not text.startswith(PROGRESS_PREFIX):
        return None
    try:
        fields = json.loads(text[len(PROGRESS_PREFIX):])
        return fields if isinstance(fields, dict) and isinstance(fields.get("n"), int) else None
    except ValueError:
        return None


class _Filter:
    """Decides which of the other ranks' lines reach the terminal: a line that matters, and the
    indented lines right after it on the same rank and stream (a traceback's frames, a warning's
    source line)."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, str], int] = {}  # (rank, stream) -> continuation lines still allowed

    def shows(self, line: Line) -> bool:
        key = (line.rank or 0, line.stream)
        if _MATTERS.search(line.text):
            self._open[key] = _MAX_CONTINUATION
            return True
        left = self._open.get(key, 0)
        if left and _CONTINUATION.match(line.text):
            self._open[key] = left - 1
            return True
        self._open.pop(key, None)
        return False


class ProgressView:
    """The launcher's bar for rank 0's progress: one live tqdm bar on a terminal; elsewhere (CI,
    tests, a pipe) a plain line at every 10 %, never a redraw."""

    def __init__(self, live: bool, out: IO[str]) -> None:
        self.live, self.out = live, out
        self._bar: Any = None
        self._decile = -1
        self._t0 = 0.0
        self._shown: tuple[int, str] | None = None

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, fields: dict[str, Any]) -> None:
        n, total = int(fields["n"]), int(fields.get("total") or 0)
        postfix = str(fields.get("postfix") or "")
        if self.live:
            self._update_live(n, total, postfix)
        else:
            self._update_lines(n, total, postfix, bool(fields.get("closed")))
        if fields.get("closed"):
            self.close()

    def _update_live(self, n: int, total: int, postfix: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total or None, initial=n, unit="step", file=self.out, dynamic_ncols=True,
                             mininterval=0.2)
        if total and self._bar.total != total:
            self._bar.total = total  # an elastic job's world changed
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(n - self._bar.n)

    def _update_lines(self, n: int, total: int, postfix: str, closed: bool) -> None:
        if self._t0 == 0.0:
            self._t0 = time.monotonic()
        decile = 10 * n // total if total else -1
        # the closing line too, when it says more than the last one did (the final loss)
        if decile > self._decile or (closed and (n, postfix) != self._shown):
            self._decile, self._shown = decile, (n, postfix)
            self.out.write(progress_text(n, total, postfix, time.monotonic() - self._t0) + "\n")
            self.out.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._decile, self._t0, self._shown = -1, 0.0, None

    def write(self, text: str, stream: IO[str]) -> None:
        """Print a line above the bar (the bar is cleared and redrawn around it)."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=stream, end="")
        else:
            stream.write(text)
        stream.flush()


def progress_text(n: int, total: int, postfix: str, elapsed: float) -> str:
    pct = f" ({100 * n // total:3d} %)" if total else ""
    tail = f" · {postfix}" if postfix else ""
    return f"hvdkit: step {n}/{total or '?'}{pct}{tail} · {elapsed:.1f} s"


class RawLog:
    """Every rank's raw output, prefixes included, up to LOG_MAX_BYTES (then counted, not kept)."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.path, self.max_bytes = path, max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
        self.written = 0
        self.dropped = 0

    def write(self, raw: str) -> None:
        size = len(raw.encode("utf-8", "replace"))
        if self.written + size > self.max_bytes:
            if not self.dropped:
                self._f.write(f"\n[hvdkit: log full at {self.max_bytes >> 20} MiB; the rest was not kept]\n")
            self.dropped += size
            return
        self._f.write(raw)
        self.written += size

    def close(self) -> None:
        self._f.close()


def log_dir() -> Path:
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hvdkit" / "logs"


def new_log_path(job_id: str | None) -> Path:
    """``<log dir>/<job id>.log`` (a new file each time: a resumed job's attempts are kept apart),
    after pruning the directory to its newest LOGS_KEPT logs."""
    d = log_dir()
    d.mkdir(parents=True, exist_ok=True)
    old = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for p in old[: max(0, len(old) - LOGS_KEPT + 1)]:
        p.unlink(missing_ok=True)
    stem = re.sub(r"[^\w.-]", "_", job_id or time.strftime("job-%Y%m%d-%H%M%S"))
    path, i = d / f"{stem}.log", 1
    while path.exists():
        i += 1
        path = d / f"{stem}.{i}.log"
    return path


class Relay:
    """Reads horovodrun's stdout and stderr pipes on one thread until both end (or, once the job
    has ended, for at most DRAIN_S more), and shows what a person should see."""

    def __init__(self, stdout_fd: int, stderr_fd: int, log: RawLog, *, out: IO[str] | None = None,
                 err: IO[str] | None = None, live: bool | None = None) -> None:
        self.out, self.err = out or sys.stdout, err or sys.stderr
        if live is None:
            live = _isatty(self.out) and _isatty(self.err)
        self.log = log
        self.view = ProgressView(live, self.err)
        self._filter = _Filter()
        self._fds = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self._stop_at: float | None = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="hvdkit-console", daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        return self

    def finish(self) -> None:
        """The job has ended: drain what is left, then stop (a grandchild that kept the pipe open
        must not keep the launcher alive)."""
        self._stop_at = time.monotonic() + DRAIN_S
        self._thread.join(DRAIN_S + 1.0)
        self.view.close()
        self.log.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        decoders, pending = {}, {}
        for fd, name in self._fds.items():
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, name)
            decoders[fd] = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending[fd] = ""
        try:
            while sel.get_map():
                if self._stop_at is not None and time.monotonic() > self._stop_at:
                    break
                for key, _ in sel.select(timeout=0.1):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    text = pending[fd] + decoders[fd].decode(chunk, final=not chunk)
                    segments = re.split(r"(?<=[\r\n])", text)
                    pending[fd] = "" if not chunk else segments.pop()
                    for seg in segments:
                        if seg:
                            self._feed_safely(seg, key.data)
                    if not chunk:
                        sel.unregister(fd)
        except Exception as e:  # noqa: BLE001 - the console must never take the job down with it
            print(f"hvdkit: console relay stopped ({type(e).__name__}: {e}); the job's output is in {self.log.path}",
                  file=sys.stderr, flush=True)
        finally:
            sel.close()

    def _feed_safely(self, raw: str, stream: str) -> None:
        # A line the console cannot handle is shown raw: the relay must keep draining the pipes,
        # or the ranks block on a full pipe and the job hangs.
        try:
            self.feed(raw, stream)
        except Exception as e:  # noqa: BLE001
            if not self._failed:
                self._failed = True
                print(f"hvdkit: console: {type(e).__name__}: {e}; showing the raw output", file=sys.stderr, flush=True)
            (self.out if stream == "stdout" else self.err).write(raw)

    def feed(self, raw: str, stream: str) -> None:
        """One segment of horovodrun's ``stream``: to the log, and to the terminal if it should be seen."""
        self.log.write(raw)
        line = parse_line(raw, stream)
        # Progress lines come from rank 0 only, but in an elastic job that lost its first rank 0
        # the survivor that took over still carries its first prefix: taken from any rank.
        fields = parse_progress(line.text)
        if fields is not None:
            self.view.update(fields)
            return
        if line.rank is None or line.rank == 0:
            if line.end == "\r" and not self.view.live:
                return  # a redraw: on a terminal it overwrites itself, anywhere else it is noise (the log has it)
            self.view.write(line.text + line.end, self.out if line.stream == "stdout" else self.err)
        elif self._filter.shows(line) or line.text.startswith(HVDKIT_PREFIX):
            # hvdkit's own lines are written by the rank that owns the job's reporting: rank 0,
            # or the elastic survivor that took over from it (shown under its first prefix)
            self.view.write(f"[rank {line.rank}] {line.text}\n", self.err)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLines:
    """Rank 0's side of the protocol, standing in for tqdm (the calls the training loops make):
    a protocol line at every 10 % and at most every 0.5 s between them, and one when it closes."""

    def __init__(self, total: int, initial: int = 0, file: IO[str] | None = None, interval_s: float = 0.5) -> None:
        self.total, self.n = total, initial
        self._file = file or sys.stderr
        self._postfix = ""
        self._interval = interval_s
        self._last = 0.0
        self._decile = -1
        self._closed = False
        self._emit()

    def update(self, k: int = 1) -> None:
        self.n += k
        decile = 10 * self.n // self.total if self.total else 0
        if decile != self._decile or time.monotonic() - self._last >= self._interval:
            self._emit()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def refresh(self) -> None:
        self._emit()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(closed=True)

    def _emit(self, closed: bool = False) -> None:
        self._last = time.monotonic()
        self._decile = 10 * self.n // self.total if self.total else 0
        fields: dict[str, Any] = {"n": self.n, "total": self.total, "postfix": self._postfix}
        if closed:
            fields["closed"] = True
        self._file.write(PROGRESS_PREFIX + json.dumps(fields, separators=(",", ":")) + "\n")
        self._file.flush()


__all__ = ["LOG_DIR_ENV", "PROGRESS_ENV", "PROGRESS_PREFIX", "Line", "ProgressLines", "ProgressView", "RawLog", "Relay",
           "new_log_path", "parse_line", "parse_progress", "progress_text"]
