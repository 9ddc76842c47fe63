"""The team tracking server for benchmarks: mlflow/server.sh (basic auth) on a fresh PostgreSQL
database from .ci/postgres, on a loopback port. ``start()`` makes both; ``kill()`` and
``launch()`` stop and start the server alone (same port, same database: an outage); ``stop()``
ends everything and drops the database."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench import _common as C


class MlflowServer:
    def __init__(self, workers: int | None = None) -> None:
        self.proc: subprocess.Popen | None = None
        self.db = f"hvdkit_bench_{secrets.token_hex(4)}"
        self.db_uri = ""
        self.tmp = Path(tempfile.mkdtemp(prefix="hvdkit-bench-server-"))
        self.log = self.tmp / "server.log"
        self.port = 0
        self.url = ""
        self.workers = workers
        self.admin = ("admin", "bench-" + secrets.token_urlsafe(18))

    def available(self) -> str | None:
        """Why the server cannot run here, or None."""
        for f in (C.REPO / ".ci" / "postgres", C.REPO / "mlflow" / "server.sh"):
            if not f.exists():
                return f"{f.relative_to(C.REPO)} is not there"
        if os.geteuid() != 0:
            return ".ci/postgres needs root"
        return None

    def start(self) -> None:
        """The database, then the server on a free port; returns once it answers /health."""
        res = subprocess.run(["bash", str(C.REPO / ".ci" / "postgres"), self.db], capture_output=True, text=True,
                             timeout=900)
        if res.returncode != 0:
            raise C.JobFailed(f".ci/postgres failed: {res.stderr.strip()[-1500:]}")
        self.db_uri = res.stdout.strip().splitlines()[-1]
        self.port = C.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.launch()
        self.wait_healthy()

    def launch(self, port: int | None = None) -> subprocess.Popen:
        """Start mlflow/server.sh (its own session) on ``port`` (default: this server's) without
        waiting for it; on another port it is a second server on the same database."""
        env = C.job_env(MLFLOW_BACKEND_STORE_URI=self.db_uri, MLFLOW_ADMIN_PASSWORD=self.admin[1],
                        MLFLOW_PORT=str(port or self.port), MLFLOW_ARTIFACTS_DESTINATION=str(self.tmp / "artifacts"),
                        TMPDIR=str(self.tmp))
        if self.workers:
            env["MLFLOW_WORKERS"] = str(self.workers)
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(["bash", str(C.REPO / "mlflow" / "server.sh")], env=env, cwd=self.tmp,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if port is None or port == self.port:
            self.proc = proc
        return proc

    def wait_healthy(self, proc: subprocess.Popen | None = None, port: int | None = None, timeout: float = 240) -> float:
        """Seconds until the server (``proc`` on ``port``, default this one) answers /health."""
        proc = proc or self.proc
        url = f"http://127.0.0.1:{port or self.port}/health"
        t0 = time.monotonic()
        while True:
            if proc is None or proc.poll() is not None:
                raise C.JobFailed(f"mlflow/server.sh exited with {proc and proc.returncode}: {self.log.read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise C.JobFailed(f"mlflow/server.sh not healthy after {timeout:.0f} s: {self.log.read_text()[-1500:]}")
            time.sleep(0.5)

    @staticmethod
    def kill(proc: subprocess.Popen | None) -> None:
        """SIGTERM to the session ``proc`` leads (script, mlflow, workers), SIGKILL if it lingers."""
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the session this bench started
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        self.kill(self.proc)
        if self.db_uri:
            try:
                import psycopg2

                p = urllib.parse.urlsplit(self.db_uri)
                conn = psycopg2.connect(host=p.hostname, port=p.port, user=p.username, password=p.password,
                                        dbname="postgres")
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
                conn.close()
            except Exception as exc:  # noqa: BLE001 - cleanup; say so, do not fail the numbers
                C.note(f"could not drop database {self.db}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)
