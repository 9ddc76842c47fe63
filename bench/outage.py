"""Tracking-server outage: the same tracked job with the MLflow server up throughout, and with the
server gone for ``outage_s`` in the middle of training, then back on the same port and database.
Does training keep its speed while rank 0's writer spools, and while it catches up afterwards?

* ``none``    ``hvdkit run recipes/digits.yaml -np 2`` (fast steps: the writer's work weighs most)
  logging to a real tracking server: mlflow/server.sh (basic auth) on PostgreSQL from
  .ci/postgres, as in the writer bench;
* ``outage``  the same job; ``lead_s`` after its first metrics reach the spool (training is under
  way), the server is stopped (SIGTERM to its session: connections refused) and ``outage_s``
  later started again.

Both variants start one server at the same moment of the job: the outage restarts the job's
server, ``none`` starts a spare one (another port, same database, stopped when the job ends).
Starting MLflow costs seconds of CPU on this 2-core machine that a real server, elsewhere,
would not take from training; paid by one variant only it would be charged to the outage.

Throughput is the Summary's samples/s (each rank's rate over all of training, summed); the ratio
outage/none is paired within a round, the order alternating between rounds. Each outage job is
checked: training was still going when the server answered again (else it would measure a job
that ended into a dead store), and the job left nothing in its spool (the backlog was delivered).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench import _common as C
from bench._server import MlflowServer

BENCH = "outage"
VARIANTS = ("none", "outage")


def config(quick: bool) -> dict:
    # steps: training must outlast lead + outage + the server's restart (20-35 s measured here,
    # under load) by enough for the writer to catch up while the job still trains.
    if quick:
        return {"steps": 12000, "outage_s": 10.0, "lead_s": 2.0, "reps": 1}
    return {"steps": 40000, "outage_s": 60.0, "lead_s": 5.0, "reps": 3}


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    cfg = config(quick)
    reps = reps or cfg["reps"]
    srv = MlflowServer(workers=1)
    why = srv.available()
    if why:
        C.emit({"bench": BENCH, "kind": "skipped", "why": why})
        C.note(f"outage: skipped: {why}")
        return []
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: list[float] = []
    restart: list[float] = []
    try:
        srv.start()
        for rnd in range(reps):
            got = {}
            for variant in C.rotated(VARIANTS, rnd):
                m = _job(srv, variant, cfg, rnd)
                got[variant] = m["samples_per_sec"]
                rates[variant].append(m["samples_per_sec"])
                restart.append(m["server_start_s"])
            ratios.append(got["outage"] / got["none"])
            C.note(f"outage round {rnd}: outage/none {ratios[-1]:.3f}")
    finally:
        srv.stop()
    what = f"digits np=2, server down {cfg['outage_s']:.0f} s mid-training"
    return [
        *(C.result(BENCH, f"np=2 samples/s [{v}]", rates[v], unit="samples/s", variant=v) for v in VARIANTS),
        C.result(BENCH, "server start (restart or spare) s", restart, unit="s"),
        C.result(BENCH, f"outage/none ({what})", ratios, goal=">= 0.99", check=lambda m: m >= 0.99,
                 ratio="outage/none", outage_s=cfg["outage_s"]),
    ]


def _job(srv: MlflowServer, variant: str, cfg: dict, rnd: int) -> dict:
    """One tracked job; for ``outage`` the server is stopped and started mid-training."""
    exp = f"bench-outage-{variant}"
    cmd = C.hvdkit_cmd(C.RECIPES / "digits.yaml", 2, ["eval.enabled=false", f"steps={cfg['steps']}"], track=True,
                       flags=["--framework", "torch", "--experiment", exp])
    with tempfile.TemporaryDirectory(prefix="hvdkit-bench-outage-") as td:
        cwd = Path(td)
        summary_path = cwd / "summary.json"
        env = C.job_env(MLFLOW_TRACKING_URI=srv.url, MLFLOW_TRACKING_USERNAME=srv.admin[0],
                        MLFLOW_TRACKING_PASSWORD=srv.admin[1])
        cmd = C.with_summary(cmd, summary_path)
        spare = None
        t0 = time.time()
        with open(cwd / "job.log", "w+") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
            try:
                t_train = _wait_first_metrics(cwd, proc, 300)
                _sleep_while(proc, t_train + cfg["lead_s"] - time.time())
                t_down = time.time()
                if variant == "outage":
                    srv.kill(srv.proc)
                _sleep_while(proc, t_down + cfg["outage_s"] - time.time())
                if variant == "outage":
                    srv.launch()
                    start_s = srv.wait_healthy()
                else:
                    port = C.free_port()
                    spare = srv.launch(port)
                    start_s = srv.wait_healthy(spare, port)
                t_back = time.time()
                rc = proc.wait(timeout=900)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                srv.kill(spare)
            log.seek(0)
            out = log.read()
        if rc != 0 or not summary_path.exists():
            tail = "\n".join(out.strip().splitlines()[-25:])
            raise C.JobFailed(f"{variant} job exited with {rc}:\n$ {' '.join(cmd)}\n{tail}")
        summary = json.loads(summary_path.read_text())
        left = list(cwd.glob("hvdkit-spool/*/events.jsonl"))
    train_end = summary["marks"]["train_end"]
    if train_end < t_back:
        raise C.JobFailed(f"{variant} job: training ended {t_back - train_end:.0f} s before the server was back: "
                          f"raise steps (now {cfg['steps']}) in bench/outage.py")
    if left or "events spooled in" in out:
        raise C.JobFailed(f"{variant} job left undelivered events in its spool:\n{out.strip()[-1500:]}")
    m = {"bench": BENCH, "kind": "measurement", "variant": variant, "round": rnd, "np": 2, "steps": summary["steps"],
         "samples_per_sec": float(summary["samples_per_sec"]), "train_s": summary.get("seconds"),
         "server_down_s": round(t_back - t_down, 1) if variant == "outage" else 0.0,
         "server_start_s": round(start_s, 1), "first_metrics_s": round(t_train - t0, 1),
         "trained_after_back_s": round(train_end - t_back, 1), "wall_s": round(time.time() - t0, 1)}
    C.emit(m)
    C.note(f"outage {variant} round {rnd}: {m['samples_per_sec']:,.0f} samples/s, server start {start_s:.1f} s, "
           f"trained {m['trained_after_back_s']:.0f} s after it was back")
    return m


def _wait_first_metrics(cwd: Path, proc: subprocess.Popen, timeout: float) -> float:
    """Until the job's spool holds a rank's first gathered metrics; the time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise C.JobFailed(f"job exited with {proc.returncode} before its first metrics")
        for events in cwd.glob("hvdkit-spool/*/events.jsonl"):
            try:
                with open(events, encoding="utf-8") as f:
                    head = f.read(1 << 18)
            except OSError:
                continue
            if '"ref":"rank0","metrics":[[' in head:
                return time.time()
        time.sleep(0.2)
    raise C.JobFailed(f"no metrics in the job's spool after {timeout:.0f} s")


def _sleep_while(proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + max(0.0, seconds)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
