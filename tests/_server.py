"""The team tracking server (mlflow/server.sh on PostgreSQL from .ci/postgres) for tests: start it
on a loopback port, talk to it over the REST API, stop it and everything it started.

Shared by tests/test_server.py (one server for the session) and tests/test_outage.py (a server
stopped and started again in the middle of a job)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, worker_env

SERVER = REPO / "mlflow" / "server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes still in session ``sid`` (the server script was started as a session leader)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(d.name))
    return pids


def listening(port: int) -> list[str]:
    """Local addresses (hex ip:port as in /proc/net/tcp) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _, state = line.split()[1:4]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                out.append(local)
    return out


@dataclass
class Server:
    url: str
    port: int
    admin: tuple[str, str]
    db_uri: str
    proc: subprocess.Popen
    log: Path
    artifacts: Path

    def request(self, method: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(self, method: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> dict:
        code, raw = self.request(method, path, body, auth or self.admin)
        assert code == 200, f"{method} {path}: HTTP {code}: {raw[:500]!r}"
        return json.loads(raw or b"{}")


def postgres_uri(db: str) -> str:
    res = subprocess.run(["bash", str(REPO / ".ci" / "postgres"), db], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f".ci/postgres failed:\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()[-1]


def drop_database(uri: str, db: str) -> None:
    import psycopg2

    parts = urllib.parse.urlsplit(uri)
    conn = psycopg2.connect(host=parts.hostname, port=parts.port, user=parts.username, password=parts.password,
                            dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        conn.close()


def launch(db_uri: str, port: int, admin: tuple[str, str], tmp: Path, log: Path) -> subprocess.Popen:
    """mlflow/server.sh on 127.0.0.1:``port`` as a new session (so stop() finds all it started),
    its output appended to ``log``; artifacts under ``tmp``/artifacts, its private state in ``tmp``."""
    env = worker_env(
        MLFLOW_BACKEND_STORE_URI=db_uri,
        MLFLOW_ADMIN_PASSWORD=admin[1],
        MLFLOW_PORT=str(port),
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"),
        MLFLOW_WORKERS="1",
        TMPDIR=str(tmp),
    )
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", str(SERVER)], env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_healthy(srv: Server, timeout: float = 240) -> float:
    """Until ``/health`` answers 200 (seconds waited); fails the test if the server exits or times out."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if srv.proc.poll() is not None:
            pytest.fail(f"mlflow/server.sh exited with {srv.proc.returncode}:\n{srv.log.read_text()[-4000:]}")
        try:
            if srv.request("GET", "/health")[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow/server.sh not healthy after {timeout:.0f} s:\n{srv.log.read_text()[-4000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole session (script, mlflow, uvicorn workers); SIGKILL what stays."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (proc.poll() is None or session_pids(proc.pid)):
            time.sleep(0.2)
        if proc.poll() is not None and not session_pids(proc.pid):
            return
    for pid in session_pids(proc.pid):  # not in the group (a daemonized child): by its id
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
