"""Shared pieces of the benchmarks: running jobs, JSON lines, paired ratios, the closing table.

Every ratio is measured side by side: one *round* runs each variant once (in an order that
rotates from round to round, so no variant always runs first or last), the ratio is taken within
the round, and the result is the median of the rounds' ratios with their spread (min..max). The
machine may be shared; pairing within a round cancels load that drifts between rounds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
BIN = Path(sys.executable).parent
PY = sys.executable

# The communication-bound model of the scaling and DDP benches: the digits MLP with hidden
# [128, 918]: 64*128+128 + 128*918+918 + 918*10+10 = 135,932 parameters (~136k, 544 kB of fp32
# gradients per step against ~1 ms of compute).
MLP136K_HIDDEN = [128, 918]


def mlp_params(inputs: int, hidden: Sequence[int], classes: int) -> int:
    n, width = 0, inputs
    for h in [*hidden, classes]:
        n += width * h + h
        width = h
    return n


# -- output ----------------------------------------------------------------------------------
_RESULTS: list[dict] = []


def emit(obj: dict) -> dict:
    """One JSON line on stdout (a measurement or a result); results are kept for the table."""
    print(json.dumps(obj, sort_keys=False, default=_json_default), flush=True)
    if obj.get("kind") == "result":
        _RESULTS.append(obj)
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def note(msg: str) -> None:
    """Progress for the person watching: stderr, so stdout stays JSON lines + the table."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def results() -> list[dict]:
    return list(_RESULTS)


def print_table(rows: list[dict] | None = None, file=None) -> None:
    rows = _RESULTS if rows is None else rows
    if not rows:
        return
    out = file or sys.stdout
    head = ("bench", "result", "median", "spread (min..max)", "reps", "goal", "ok")
    body = []
    for r in rows:
        med = r.get("median")
        fmt = _fmt(r.get("unit"))
        spread = f"{fmt(r['min'])}..{fmt(r['max'])}" if r.get("min") is not None else ""
        goal = r.get("goal") or ""
        ok = "" if r.get("ok") is None else ("yes" if r["ok"] else "NO")
        body.append((r["bench"], r["name"], fmt(med) if med is not None else "n/a", spread, str(r.get("reps", "")), goal, ok))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print("", file=out)
    print(line, file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for b in body:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) if i < 5 else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))), file=out)
    out.flush()


def _fmt(unit: str | None) -> Callable[[float | None], str]:
    def f(v: float | None) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "n/a"
        if unit in (None, "ratio"):
            return f"{v:.3f}"
        if unit == "s":
            return f"{v:.2f}s"
        if unit in ("MB", "M"):  # megabytes, millions of parameters
            return f"{v:,.2f}"
        return f"{v:,.0f}"

    return f


# -- statistics ------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "reps": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "reps": len(vals),
            "values": [round(v, 6) for v in vals]}


def result(bench: str, name: str, values: Sequence[float], *, goal: str | None = None,
           check: Callable[[float], bool] | None = None, unit: str = "ratio", **extra: Any) -> dict:
    s = summarize(values)
    ok = None if (check is None or s["median"] is None) else bool(check(s["median"]))
    return emit({"bench": bench, "kind": "result", "name": name, "unit": unit, **s, "goal": goal, "ok": ok, **extra})


def rotated(variants: Sequence[str], rnd: int) -> list[str]:
    """Round ``rnd``'s order: a rotation, and reversed every other round (ABC, CBA... then BCA, ACB...)."""
    k = rnd // 2 % len(variants)
    order = list(variants[k:]) + list(variants[:k])
    return order[::-1] if rnd % 2 else order


# -- jobs ------------------------------------------------------------------------------------
def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    )
    for k in [k for k in env if k.startswith("HOROVOD_") or k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")]:
        env.pop(k)  # a knob or store from the caller's shell must not leak into one variant only
    env.update(extra)
    return env


class JobFailed(RuntimeError):
    pass


@dataclass
class JobResult:
    samples_per_sec: float
    wall_s: float
    marks: dict[str, float]  # seconds since launch (see hvdkit.train: first_step, train_end...)
    summary: dict = field(default_factory=dict)


def run_job(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600, what: str = "job") -> JobResult:
    """Run one job that writes rank 0's summary: hvdkit's ``--summary-json`` (the :data:`SUMMARY`
    placeholder in ``cmd``) or a bench runner's ``$HVDKIT_SUMMARY_JSON``."""
    with tempfile.TemporaryDirectory(prefix="hvdkit-bench-") as td:
        summary_path = Path(td) / "summary.json"
        env = dict(env or job_env())
        env["HVDKIT_SUMMARY_JSON"] = str(summary_path)  # read by bench runners only, never by hvdkit
        cmd = with_summary(cmd, summary_path)
        t0 = time.time()
        proc = subprocess.run(list(cmd), env=env, cwd=cwd or td, capture_output=True, text=True, timeout=timeout)
        wall = time.time() - t0
        if proc.returncode != 0 or not summary_path.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise JobFailed(f"{what} exited with {proc.returncode}:\n$ {' '.join(cmd)}\n{tail}")
        summary = json.loads(summary_path.read_text())
    marks = {k: v - t0 for k, v in (summary.get("marks") or {}).items()}
    return JobResult(float(summary["samples_per_sec"]), wall, marks, summary)


# Stands for the summary file in a command line; run_job (or with_summary) puts the path in.
SUMMARY = "{summary_json}"


def with_summary(cmd: Sequence[str], path: str | Path) -> list[str]:
    return [str(path) if a == SUMMARY else a for a in cmd]


def hvdkit_cmd(recipe: str | Path, np: int, overrides: Sequence[str] = (), *, track: bool = False,
               flags: Sequence[str] = ()) -> list[str]:
    cmd = [str(BIN / "hvdkit"), "run", str(recipe), "-np", str(np), "--summary-json", SUMMARY, *flags]
    if not track:
        cmd.append("--no-track")
    return [*cmd, *QUIET, *overrides]


# What every bench job turns off: the progress bar (a terminal nicety), checkpoints.
QUIET = ("log.progress=false", "checkpoint.dir=null")


def horovodrun_cmd(np: int, argv: Sequence[str], *, flags: Sequence[str] = ()) -> list[str]:
    """hvdkit's launcher shim (stock horovodrun minus its framework probe) around ``argv``."""
    return [PY, "-m", "hvdkit._horovodrun", "-np", str(np), "--gloo", *flags, *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempStore:
    """A fresh sqlite MLflow store in a temp dir, migrated once (so no job pays for that)."""

    def __init__(self, name: str = "mlflow") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"hvdkit-bench-{name}-"))
        self.uri = f"sqlite:///{self.dir / 'mlflow.db'}"
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=self.uri).search_experiments()  # creates + migrates the schema

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "TempStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def machine() -> dict:
    """What ran the numbers: CPU model, cores, memory, load."""
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Core(s) per socket", "Socket(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[k.strip().lower().replace(" ", "_").replace("(s)", "s")] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def run_ddp_job(np: int, recipe: str | Path, overrides: Sequence[str], *, env: dict[str, str] | None = None,
                timeout: float = 600) -> JobResult:
    """``np`` processes of ``bench.ddp_train`` with env initialisation (what torchrun sets)."""
    with tempfile.TemporaryDirectory(prefix="hvdkit-bench-ddp-") as td:
        summary_path = Path(td) / "summary.json"
        base = dict(env or job_env())
        base.update(HVDKIT_SUMMARY_JSON=str(summary_path), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    WORLD_SIZE=str(np), LOCAL_WORLD_SIZE=str(np))
        cmd = [PY, "-m", "bench.ddp_train", str(recipe), *QUIET, *overrides]
        t0 = time.time()
        procs = [subprocess.Popen(cmd, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), cwd=td, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(np)]
        outs, rcs = [], []
        deadline = t0 + timeout
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, _ = p.communicate()
            outs.append(out)
            rcs.append(p.returncode)
        wall = time.time() - t0
        if any(rcs) or not summary_path.exists():
            tail = "\n".join("".join(outs).strip().splitlines()[-25:])
            raise JobFailed(f"DDP job exited with {rcs}:\n$ {' '.join(cmd)}\n{tail}")
        summary = json.loads(summary_path.read_text())
    marks = {k: v - t0 for k, v in (summary.get("marks") or {}).items()}
    return JobResult(float(summary["samples_per_sec"]), wall, marks, summary)
