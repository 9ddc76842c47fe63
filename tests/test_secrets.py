"""No credential travels in the clear: a 2-host job (the netns ssh hosts of tests/_netns.py) logs
to a password-protected MLflow server (mlflow/server.sh on PostgreSQL) as a non-admin user whose
password is in the launcher's environment. While it runs, every process in the hosts' namespaces,
every ssh process and horovodrun itself is scanned (/proc/PID/cmdline and /proc/PID/environ), and
every ssh command line is logged: the password is in none of them. Rank 0 reads the credentials
from ~/.mlflow/credentials (mode 600) under a temporary HOME (never /root/.mlflow), and the runs
land. A credentials file others can read, a missing one, or a tracking URI with a password in it
is one line, exit 2, nothing started.

Needs root (`ip netns`) and PostgreSQL (.ci/postgres), as tests/test_multihost.py and
tests/test_server.py do.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import pytest

from _netns import LAUNCHER_IP, SUBNET, Cluster, leftovers, netns_cluster, ns_name
from _server import Server, drop_database, free_port, launch, postgres_uri, session_pids, stop, wait_healthy
from conftest import REPO, hvdkit

pytestmark = [pytest.mark.system, pytest.mark.horovod]

EXPERIMENT = "secrets-test"
HOSTS = f"{SUBNET}.2:1,{SUBNET}.3:1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    with netns_cluster(tmp_path_factory.mktemp("secrets-hosts")) as c:
        yield c


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory) -> Server:
    """The server on the bridge address, where rank 0's namespace reaches it."""
    tmp = tmp_path_factory.mktemp("secrets-server")
    db = f"mlflow_secrets_{secrets.token_hex(4)}"
    db_uri = postgres_uri(db)
    port = free_port()
    admin = ("admin", "adm-" + secrets.token_urlsafe(18))
    log = tmp / "server.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HOST", LAUNCHER_IP)
        proc = launch(db_uri, port, admin, tmp, log)
    srv = Server(f"http://{LAUNCHER_IP}:{port}", port, admin, db_uri, proc, log, tmp / "artifacts")
    try:
        wait_healthy(srv, 240)
        yield srv
    finally:
        stop(proc)
        left = session_pids(proc.pid)
        drop_database(db_uri, db)
        assert not left, f"server processes left running: {left}"


@pytest.fixture(scope="module")
def trainer(server) -> tuple[str, str]:
    user = ("trainer", "trn-" + secrets.token_urlsafe(18))
    server.api("POST", "/api/2.0/mlflow/users/create", {"username": user[0], "password": user[1]})
    return user


def _credentials_file(path: Path, user: tuple[str, str], mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {user[0]}\nmlflow_tracking_password = {user[1]}\n")
    path.chmod(mode)
    return path


def _job_env(cluster: Cluster, server: Server, user: tuple[str, str], **extra: str) -> dict[str, str]:
    return {**cluster.env, "MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": user[0],
            "MLFLOW_TRACKING_PASSWORD": user[1], **extra}


def _run(cluster: Cluster, name: str, env: dict[str, str], timeout: int = 600, controller: str = "gloo"):
    work = cluster.tmp / name
    work.mkdir()
    return hvdkit(["run", str(REPO / "recipes" / "digits.yaml"), "-np", "2", "-H", HOSTS, "-i", str(cluster.key),
                   f"--{controller}", "--framework", "torch", "--experiment", EXPERIMENT, "epochs=2", "log.progress=false",
                   f"checkpoint.dir={work / 'ckpt'}"], cwd=work, env=env, timeout=timeout)


class Scanner(threading.Thread):
    """Reads /proc/PID/cmdline and /proc/PID/environ of every process in the hosts' namespaces,
    every process with "ssh" in its command line and horovodrun (hvdkit._horovodrun), over and
    over while a job runs; records each process seen and every place ``secret`` turned up."""

    def __init__(self, secret: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.secret = secret.encode()
        self.interval = interval
        self.stop = threading.Event()
        self.netns = {os.stat(f"/run/netns/{ns_name(o)}").st_ino: ns_name(o) for o in (2, 3)}
        self.seen: dict[tuple[int, str], str] = {}  # (pid, start time) -> what it is
        self.ranks: dict[str, set[str]] = {}  # namespace -> variable names of a rank's environ
        self.found: list[str] = []
        self.passes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            self.passes += 1
            self.stop.wait(self.interval)
        self.scan()

    def scan(self) -> None:
        me = os.getpid()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                cmdline = (d / "cmdline").read_bytes()
                net = os.readlink(d / "ns" / "net")
                start = (d / "stat").read_text().rsplit(")", 1)[1].split()[19]
            except OSError:
                continue
            ns = next((name for ino, name in self.netns.items() if net == f"net:[{ino}]"), None)
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            if ns is None and b"ssh" not in cmdline and b"hvdkit._horovodrun" not in cmdline:
                continue
            try:
                environ = (d / "environ").read_bytes()
            except OSError:
                continue
            if not cmdline and not environ:  # a zombie or a kernel thread: nothing to read
                continue
            self.seen[(int(d.name), start)] = f"{ns or 'launcher'}: {text[:120]}"
            for where, blob in (("cmdline", cmdline), ("environ", environ)):
                if self.secret in blob:
                    self.found.append(f"{where} of {d.name} ({ns or 'launcher'}): {text[:200]}")
            if ns and b"hvdkit.train" in cmdline:
                self.ranks.setdefault(ns, set()).update(
                    kv.split(b"=", 1)[0].decode() for kv in environ.split(b"\0") if b"=" in kv)


def _all_runs(server: Server) -> set[str]:
    exps = server.api("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
    body = {"experiment_ids": [e["experiment_id"] for e in exps], "max_results": 1000}
    return {r["info"]["run_id"] for r in server.api("POST", "/api/2.0/mlflow/runs/search", body).get("runs", [])}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_password_reaches_no_remote_command_line_or_environment_and_the_runs_land(cluster, server, trainer, capsys,
                                                                                 controller):
    """Gloo: the ranks' environment travels on the ssh command line (`env NAME=VALUE ...`); --mpi:
    as mpirun's `-x NAME` list, the values over Open MPI's own TCP channel to its daemons."""
    home = cluster.tmp / f"home-{controller}"  # the launcher's HOME, forwarded to the ranks: rank 0 reads the file there
    cred = _credentials_file(home / ".mlflow" / "credentials", trainer)
    env = _job_env(cluster, server, trainer, HOME=str(home))
    runs_before = _all_runs(server)
    log_before = cluster.ssh_log.read_text() if cluster.ssh_log.exists() else ""
    scanner = Scanner(trainer[1])
    t0 = time.monotonic()
    scanner.start()
    try:
        res = _run(cluster, f"job-{controller}", env, controller=controller)
    finally:
        scanner.stop.set()
        scanner.join(30)
    seconds = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]

    # nothing holds the password: no process of the hosts, no ssh, not horovodrun
    assert not scanner.found, scanner.found
    in_ns = [w for w in scanner.seen.values() if not w.startswith("launcher")]
    ssh_procs = [w for w in scanner.seen.values() if "ssh" in w]
    assert set(scanner.ranks) == {ns_name(2), ns_name(3)}, scanner.ranks  # both ranks' environments were read
    for ns, names in scanner.ranks.items():
        assert "MLFLOW_TRACKING_URI" in names and "MLFLOW_TRACKING_PASSWORD" not in names, (ns, sorted(names))
        assert "MLFLOW_TRACKING_USERNAME" not in names, ns  # the file's user, not the launcher's
    assert any("hvdkit._horovodrun" in w for w in scanner.seen.values())
    # every ssh command line hvdkit and horovodrun ran (the wrapper logged them)
    ssh_lines = cluster.ssh_log.read_text()[len(log_before):].splitlines()
    assert len(ssh_lines) >= 6, ssh_lines  # probes, horovodrun's checks, task servers, one per rank
    assert not [ln for ln in ssh_lines if trainer[1] in ln]
    if controller == "gloo":  # the environment does travel on the command line, without the password
        assert any("hvdkit.train" in ln and "MLFLOW_TRACKING_URI=" in ln for ln in ssh_lines)
    else:  # mpirun's ssh starts Open MPI's daemon on each host
        assert sum("orted" in ln for ln in ssh_lines) == 2, ssh_lines
    assert all("BatchMode=yes" in ln and "StrictHostKeyChecking" not in ln for ln in ssh_lines)
    # and the job says what it did, without the password
    assert trainer[1] not in out
    assert "hvdkit: kept on the launcher, not forwarded to the hosts: MLFLOW_TRACKING_PASSWORD, " \
           "MLFLOW_TRACKING_USERNAME" in res.stderr, res.stderr[-3000:]
    # rank 0 only, once: hvdkit run's console shows rank 0's lines without a prefix, another
    # rank's as "[rank N] ..."; the raw log keeps horovodrun's prefixes
    said = [ln for ln in out.splitlines() if "MLflow credentials:" in ln]
    assert len(said) == 1 and not said[0].startswith("[rank "), said
    assert f"MLflow credentials: user trainer from the file {cred}" in said[0], said

    # the runs landed, read back over the REST API as the non-admin user
    exp = server.api("GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}",
                     auth=trainer)["experiment"]
    runs = server.api("POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                              "max_results": 100}, auth=trainer).get("runs", [])
    runs = [r for r in runs if r["info"]["run_id"] not in runs_before]
    parents = [r for r in runs if _tags(r).get("hvdkit.role") == "parent"]
    children = [r for r in runs if _tags(r).get("hvdkit.role") == "rank"]
    assert len(parents) == 1 and len(children) == 2, [_tags(r).get("hvdkit.role") for r in runs]
    assert parents[0]["info"]["status"] == "FINISHED" and all(c["info"]["status"] == "FINISHED" for c in children)
    # Gloo names a rank's host as -H does; under mpirun it is the host's own hostname
    hosts = [f"{SUBNET}.2", f"{SUBNET}.3"] if controller == "gloo" else [ns_name(2), ns_name(3)]
    assert _tags(parents[0])["hvdkit.hosts"].split(",") == hosts
    assert {_tags(c)["mlflow.parentRunId"] for c in children} == {parents[0]["info"]["run_id"]}
    assert not cluster.settle() and not leftovers(str(cluster.tmp / f"job-{controller}"))
    with capsys.disabled():
        print(f"\ntest_secrets[{controller}]: job {seconds:.1f} s; {len(scanner.seen)} processes scanned in {scanner.passes} "
              f"passes ({len(in_ns)} in the hosts' namespaces, {len(ssh_procs)} ssh); {len(ssh_lines)} ssh "
              "command lines; password found in none")


REFUSED = ["open-credentials-file", "no-credentials-file", "password-in-uri"]


@pytest.mark.parametrize("case", REFUSED)
def test_refused_before_anything_starts(cluster, server, trainer, case):
    extra: dict[str, str] = {"HOME": str(cluster.tmp / f"home-{case}")}
    if case == "open-credentials-file":  # named by HVDKIT_MLFLOW_CREDENTIALS, readable by everyone
        cred = _credentials_file(cluster.tmp / f"cred-{case}" / "credentials", trainer, 0o644)
        extra["HVDKIT_MLFLOW_CREDENTIALS"] = str(cred)
        needles = [str(cred), "mode 0644", "others can read it", f"chmod 600 {cred}", f"{SUBNET}.2"]
    elif case == "no-credentials-file":
        needles = [f"{SUBNET}.2", str(cluster.tmp / f"home-{case}" / ".mlflow" / "credentials"), "mode 600"]
    else:
        user, password = trainer
        extra["MLFLOW_TRACKING_URI"] = server.url.replace("http://", f"http://{user}:{password}@")
        needles = [f"http://{user}:***@{LAUNCHER_IP}", "credentials file"]
    env = _job_env(cluster, server, trainer, **extra)
    before = {o: cluster.accepted(o) for o in cluster.sshd}
    runs_before = _all_runs(server)
    res = _run(cluster, case, env, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: error:")]
    assert len(errors) == 1 and "fix:" in errors[0], res.stderr[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]
    assert trainer[1] not in res.stdout + res.stderr
    # nothing started: no checkpoint, no run, at most hvdkit's one probe per host
    assert not list((cluster.tmp / case).glob("ckpt/*"))
    assert all(cluster.accepted(o) - before[o] <= 1 for o in cluster.sshd)
    assert _all_runs(server) == runs_before
    assert not cluster.settle() and not leftovers(str(cluster.tmp / case))


def test_single_host_job_keeps_its_environment_and_no_command_line_names_the_password(cluster, server, trainer):
    """One host, as before this change: the ranks get the password from the environment (inherited
    from horovodrun, not written on their `env ...` command lines) and the runs land."""
    # The mark tells this job's processes from any other hvdkit job on the machine.
    mark = f"HVDKIT_TEST_JOB={os.getpid()}-{time.monotonic_ns()}".encode()
    env = _job_env(cluster, server, trainer, HOME=str(cluster.tmp / "home-single"),  # no credentials file there
                   HVDKIT_TEST_JOB=mark.decode().split("=", 1)[1])
    runs_before = _all_runs(server)
    scanner = Scanner(trainer[1])
    scanner.netns = {}  # everything runs here: look at the ranks and horovodrun
    rank_env: dict[int, bool] = {}

    def look() -> None:
        while not scanner.stop.is_set():
            for d in Path("/proc").iterdir():
                try:
                    cmdline = (d / "cmdline").read_bytes()
                    if b"hvdkit.train" in cmdline or b"hvdkit._horovodrun" in cmdline:
                        if trainer[1].encode() in cmdline:
                            scanner.found.append(f"cmdline of {d.name}: {cmdline[:200]!r}")
                        environ = (d / "environ").read_bytes()
                        if b"hvdkit.train" in cmdline and mark in environ.split(b"\0"):
                            rank_env[int(d.name)] = trainer[1].encode() in environ
                except OSError:
                    continue
            scanner.stop.wait(0.1)

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    work = cluster.tmp / "single"
    work.mkdir()
    try:
        res = hvdkit(["run", str(REPO / "recipes" / "digits.yaml"), "-np", "2", "--framework", "torch", "--experiment",
                      EXPERIMENT, "epochs=1", "log.progress=false", f"checkpoint.dir={work / 'ckpt'}"],
                     cwd=work, env=env, timeout=600)
    finally:
        scanner.stop.set()
        watcher.join(30)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert not scanner.found, scanner.found
    assert len(rank_env) >= 2 and all(rank_env.values()), rank_env  # both ranks have it, inherited
    assert "not forwarded" not in out and trainer[1] not in out
    said = [ln for ln in out.splitlines() if "MLflow credentials:" in ln]
    assert len(said) == 1 and "user trainer, password from MLFLOW_TRACKING_PASSWORD in the environment" in said[0], said
    new = [r for r in server.api("POST", "/api/2.0/mlflow/runs/search",
                                 {"experiment_ids": [e["experiment_id"] for e in server.api(
                                     "POST", "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]],
                                  "max_results": 1000})["runs"] if r["info"]["run_id"] not in runs_before]
    assert len(new) == 3 and all(r["info"]["status"] == "FINISHED" for r in new), [r["info"]["status"] for r in new]
