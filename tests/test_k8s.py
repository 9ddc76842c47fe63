"""docker/k8s/: the Kubernetes manifests (MLflow server + PostgreSQL, the MPIJob) parse and point at
the right images, services and secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCKER = REPO / "docker"
IMAGE = "hvdkit-cpu:0.1.0"
USER_HOME = "/home/hvd"


# -- Kubernetes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((DOCKER / "k8s").glob("*.yaml"))}


def _env_of(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_mpijob_runs_the_recipe_on_the_workers(k8s):
    (job,) = k8s["mpijob.yaml"]
    assert job["apiVersion"] == "kubeflow.org/v2beta1" and job["kind"] == "MPIJob"
    spec = job["spec"]
    assert spec["sshAuthMountPath"] == f"{USER_HOME}/.ssh"
    launcher = spec["mpiReplicaSpecs"]["Launcher"]
    worker = spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1
    (lc,) = launcher["template"]["spec"]["containers"]
    (wc,) = worker["template"]["spec"]["containers"]
    assert lc["image"] == wc["image"] == IMAGE
    args = lc["args"]
    assert args[:2] == ["hvdkit", "run"] and (REPO / Path(args[2]).relative_to("/opt/hvdkit")).is_file()
    assert args[args.index("--hostfile") + 1] == "/etc/mpi/hostfile"
    assert int(args[args.index("-np") + 1]) == worker["replicas"] * spec["slotsPerWorker"]
    assert wc["args"] == ["sshd"] and wc["readinessProbe"]["tcpSocket"]["port"] == 2222
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    for rs in (launcher, worker):
        sc = rs["template"]["spec"]["securityContext"]
        assert sc["runAsUser"] == 1000 and sc["runAsNonRoot"] is True


def test_mpijob_tracks_to_the_in_cluster_server(k8s):
    (job,) = k8s["mpijob.yaml"]
    (lc,) = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"]
    env = _env_of(lc)
    host, port = re.fullmatch(r"http://([\w.-]+):(\d+)", env["MLFLOW_TRACKING_URI"]).groups()
    services = {d["metadata"]["name"]: d for d in k8s["mlflow.yaml"] if d["kind"] == "Service"}
    svc = services[host.split(".")[0]]
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    deploy = next(d for d in k8s["mlflow.yaml"] if d["kind"] == "Deployment")
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    (mc,) = deploy["spec"]["template"]["spec"]["containers"]
    assert mc["image"] == IMAGE and mc["args"] == ["mlflow-server"]
    menv = _env_of(mc)
    assert menv["MLFLOW_HOST"] == "0.0.0.0" and f"{host}:{port}" in menv["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert int(port) in [p["containerPort"] for p in mc["ports"]] and mc["readinessProbe"]["httpGet"]["path"] == "/health"
    # credentials only from Secrets, never inline
    for e in (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"], menv["MLFLOW_ADMIN_PASSWORD"],
              menv["MLFLOW_BACKEND_STORE_URI"]):
        assert isinstance(e, dict) and "secretKeyRef" in e, e
    # the database the server's secret points at is this file's PostgreSQL
    pg = next(d for d in k8s["mlflow.yaml"] if d["kind"] == "StatefulSet")
    assert pg["spec"]["serviceName"] in services
    assert "postgresql+psycopg2://mlflow:" in (DOCKER / "k8s" / "mlflow.yaml").read_text()
    pvc = next(d for d in k8s["mlflow.yaml"] if d["kind"] == "PersistentVolumeClaim")
    vols = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in mc["volumeMounts"] if m["mountPath"] == menv["MLFLOW_ARTIFACTS_DESTINATION"])
    assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
