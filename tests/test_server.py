"""The team tracking server (mlflow/server.sh) for real: PostgreSQL from .ci/postgres, MLflow's
basic-auth app on a free loopback port, a 2-rank `hvdkit run` logging to it with credentials from
the environment, everything read back over the REST API."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from _server import SERVER, Server, drop_database as _drop_database, free_port as _free_port, launch, \
    listening as _listening, postgres_uri as _postgres_uri, session_pids as _session_pids, stop as _stop, wait_healthy
from conftest import REPO, hvdkit, worker_env

pytestmark = pytest.mark.system  # tests/_suite.py's third tier

EXPERIMENT = "server-test"


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    db = f"mlflow_test_{secrets.token_hex(4)}"
    db_uri = _postgres_uri(db)
    port = _free_port()
    admin = ("admin", "adm %-" + secrets.token_urlsafe(18))  # a space and a % survive the ini file
    log = tmp / "server.log"
    proc = launch(db_uri, port, admin, tmp, log)
    srv = Server(f"http://127.0.0.1:{port}", port, admin, db_uri, proc, log, tmp / "artifacts")
    try:
        wait_healthy(srv, 240)
        yield srv
    finally:
        _stop(proc)
        left = _session_pids(proc.pid)
        _drop_database(db_uri, db)
        assert not left, f"server processes left running: {left}"
        # the script's private state (basic_auth.ini holds the admin password) went with it
        assert not list(tmp.glob("hvdkit-mlflow.*")), "mlflow/server.sh left its state directory"


@pytest.fixture(scope="session")
def trained(server: Server, tmp_path_factory) -> dict:
    """A 2-rank job logged by a non-admin user whose credentials come from the environment."""
    tmp = tmp_path_factory.mktemp("server-job")
    user = ("trainer", "trn-" + secrets.token_urlsafe(18))
    server.api("POST", "/api/2.0/mlflow/users/create", {"username": user[0], "password": user[1]})
    env = worker_env(MLFLOW_TRACKING_URI=server.url, MLFLOW_TRACKING_USERNAME=user[0],
                     MLFLOW_TRACKING_PASSWORD=user[1])
    t0 = time.perf_counter()
    res = hvdkit(["run", str(REPO / "recipes" / "digits.yaml"), "-np", "2", "--framework", "torch",
                  "--experiment", EXPERIMENT, "epochs=2", f"checkpoint.dir={tmp / 'ckpt'}", "log.progress=false"],
                 cwd=tmp, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    exp = server.api("GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + EXPERIMENT)["experiment"]
    runs = server.api("POST", "/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [exp["experiment_id"]], "max_results": 100}).get("runs", [])
    return {"user": user, "runs": runs, "tmp": tmp, "output": res.stdout + res.stderr,
            "seconds": time.perf_counter() - t0}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _files(server: Server, run_id: str, path: str = "") -> list[str]:
    q = urllib.parse.urlencode({"run_id": run_id, **({"path": path} if path else {})})
    out = []
    for f in server.api("GET", "/api/2.0/mlflow/artifacts/list?" + q).get("files", []):
        out += _files(server, run_id, f["path"]) if f["is_dir"] else [f["path"]]
    return out


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.horovod
def test_two_rank_job_logs_parent_and_children(server, trained):
    runs = trained["runs"]
    parents = [r for r in runs if _tags(r).get("hvdkit.role") == "parent"]
    children = [r for r in runs if _tags(r).get("hvdkit.role") == "rank"]
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2, [_tags(r).get("hvdkit.role") for r in runs]
    parent = parents[0]
    pid = parent["info"]["run_id"]
    assert {_tags(c)["mlflow.parentRunId"] for c in children} == {pid}
    assert sorted(_tags(c)["hvdkit.rank"] for c in children) == ["0", "1"]
    assert all(r["info"]["status"] == "FINISHED" for r in runs)
    # the job's own (non-admin) credentials read them back too
    mine = server.api("POST", "/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [parent["info"]["experiment_id"]]}, auth=trained["user"])
    assert len(mine.get("runs", [])) == 3
    pm = {m["key"] for m in parent["data"].get("metrics", [])}
    assert {"samples_per_sec", "loss", "world_size", "val_loss", "val_accuracy"} <= pm, pm
    for c in children:
        cm = {m["key"] for m in c["data"].get("metrics", [])}
        assert {"samples_per_sec", "step_time_s", "loss", "rss_mb"} <= cm, cm
    # a metric's history is there too, not only the latest value
    # max_results as MLflow's client sends it: MLflow 3.10's server reads a missing one as 0 and
    # returns no points (its own client is unaffected; fixed in later releases)
    hist = server.api("GET", f"/api/2.0/mlflow/metrics/get-history?run_id={pid}&metric_key=samples_per_sec"
                             "&max_results=25000")
    assert len(hist["metrics"]) >= 2
    # artifacts went through the server's proxy into --artifacts-destination
    assert parent["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    assert any(p.startswith("checkpoints/") for p in _files(server, pid))
    assert any(server.artifacts.rglob("ckpt-e*"))


def test_requests_without_valid_credentials_are_refused(server):
    body = {"experiment_ids": ["0"], "max_results": 1}
    assert server.request("POST", "/api/2.0/mlflow/runs/search", body)[0] == 401
    assert server.request("POST", "/api/2.0/mlflow/runs/search", body, auth=("admin", "password1234"))[0] == 401
    assert server.request("POST", "/api/2.0/mlflow/runs/search", body, auth=(server.admin[0], server.admin[1] + "x"))[0] == 401
    assert server.request("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=1")[0] == 401
    assert server.request("POST", "/api/2.0/mlflow/runs/search", body, auth=server.admin)[0] == 200
    # a Host header outside --allowed-hosts (DNS rebinding) is refused before auth
    code, _ = server.request("POST", "/api/2.0/mlflow/runs/search", body, auth=server.admin,
                             headers={"Host": "evil.example.com"})
    assert code in (400, 403), code


def test_server_listens_on_loopback_only_and_keeps_secrets_off_command_lines(server):
    assert _listening(server.port) == [f"0100007F:{server.port:04X}"]
    db_password = urllib.parse.urlsplit(server.db_uri).password
    for pid in [server.proc.pid, *_session_pids(server.proc.pid)]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert server.admin[1] not in cmdline and db_password not in cmdline, pid


@pytest.mark.horovod
def test_credentials_appear_nowhere_in_params_tags_or_artifacts(server, trained, tmp_path):
    secrets_ = [trained["user"][1], server.admin[1], urllib.parse.urlsplit(server.db_uri).password]
    for run in trained["runs"]:
        rid = run["info"]["run_id"]
        full = server.api("GET", f"/api/2.0/mlflow/runs/get?run_id={rid}")["run"]
        blob = json.dumps(full["data"])
        assert full["data"].get("tags"), rid
        for s in secrets_:
            assert s not in blob, f"a password appears in the params/tags of run {rid}"
        for path in _files(server, rid):
            code, raw = server.request("GET", "/get-artifact?" + urllib.parse.urlencode({"run_uuid": rid, "path": path}),
                                       auth=server.admin)
            assert code == 200, (path, code)
            assert raw, path
            for s in secrets_:
                assert s.encode() not in raw, f"a password appears in artifact {path} of run {rid}"
    parent = next(r for r in trained["runs"] if _tags(r).get("hvdkit.role") == "parent")
    assert _files(server, parent["info"]["run_id"]), "the job logged no artifact to check"
    # nor in what the job left on disk (spool, checkpoints) or printed
    for f in trained["tmp"].rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not any(s.encode() in data for s in secrets_), f
    assert not any(s in trained["output"] for s in secrets_)


def _run_watching_cmdlines(args: list[str], env: dict[str, str], cwd: Path, secret: str) -> tuple[int, str, list[str]]:
    """Run ``hvdkit ARGS`` and sample every process's command line while it runs: which ones held ``secret``."""
    from conftest import BIN

    seen: list[str] = []
    with open(cwd / "out.log", "wb") as out:
        proc = subprocess.Popen([str(BIN / "hvdkit"), *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        cmd = (d / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if secret.encode() in cmd:
                        seen.append(cmd.replace(b"\0", b" ").decode(errors="replace")[:120])
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
    return rc, (cwd / "out.log").read_text(errors="replace"), seen


@pytest.mark.horovod
def test_credentials_file_keeps_the_password_off_command_lines(server, tmp_path):
    """horovodrun --gloo puts the launcher's environment on each worker's command line (`sh -c env
    K=V ... python`, or inside the ssh command), where `ps` shows it: mlflow/README.md recommends
    ~/.mlflow/credentials on rank 0's host instead of MLFLOW_TRACKING_PASSWORD. That route works,
    and the password is on no command line while the job runs."""
    user = ("filecreds", "fil-" + secrets.token_urlsafe(18))
    server.api("POST", "/api/2.0/mlflow/users/create", {"username": user[0], "password": user[1]})
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    creds = home / ".mlflow" / "credentials"
    creds.write_text(f"[mlflow]\nmlflow_tracking_username = {user[0]}\nmlflow_tracking_password = {user[1]}\n")
    creds.chmod(0o600)
    env = worker_env(MLFLOW_TRACKING_URI=server.url, HOME=str(home))
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        env.pop(k, None)
    rc, out, seen = _run_watching_cmdlines(
        ["run", str(REPO / "recipes" / "digits.yaml"), "-np", "2", "--framework", "torch", "--experiment", "filecreds",
         "epochs=1", f"checkpoint.dir={tmp_path / 'ckpt'}", "log.progress=false"], env, tmp_path, user[1])
    assert rc == 0, out[-4000:]
    assert not seen, f"the password was on a command line: {seen[:3]}"
    exp = server.api("GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=filecreds", auth=user)["experiment"]
    runs = server.api("POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]}, auth=user)["runs"]
    assert sorted(_tags(r)["hvdkit.role"] for r in runs) == ["parent", "rank", "rank"]


@pytest.mark.parametrize("password,needle", [(None, "MLFLOW_ADMIN_PASSWORD is not set"),
                                             ("", "MLFLOW_ADMIN_PASSWORD is not set"),
                                             ("password1234", "password1234"),
                                             ("short-pw", "shorter than 12"),
                                             (" a-long-password-with-a-leading-space", "white space")])
def test_server_refuses_to_start_without_a_safe_admin_password(tmp_path, password, needle):
    port = _free_port()
    env = worker_env(MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://mlflow:x@127.0.0.1:1/none", MLFLOW_PORT=str(port),
                     TMPDIR=str(tmp_path), MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "art"))
    env.pop("MLFLOW_ADMIN_PASSWORD", None)
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
    if password is not None:
        env["MLFLOW_ADMIN_PASSWORD"] = password
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(SERVER)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 2, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow/server.sh: error: ") and needle in lines[0], err
    assert out == ""
    assert time.monotonic() - t0 < 30
    assert not _session_pids(proc.pid), "something was left running"
    assert not _listening(port)
    assert list(tmp_path.iterdir()) == [], "it wrote files before refusing"
