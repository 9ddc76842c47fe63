"""docker/k8s/: the Kubernetes manifests (MLflow server + PostgreSQL, the MPIJob, its storage and the
NetworkPolicies, the kustomization).

- Every core object is validated against the Kubernetes API schemas (kubernetes-validate, strict:
  an unknown field fails), the MPIJob's pod templates as core PodTemplates, and the MPIJob's own
  fields against the MPI Operator's v2beta1 API (kubeflow/mpi-operator v0.8.2,
  pkg/apis/kubeflow/v2beta1/types.go and pkg/apis/kubeflow/validation/validation.go).
- Every pod meets the "restricted" Pod Security Standard (the checks are written out below).
- No credential is inline; MLflow logs in to PostgreSQL as an ordinary role; the init script that
  creates it is run against a real PostgreSQL server where one is installed (root, as in CI).
- The NetworkPolicies are evaluated: who can reach which pod on which port.
- The ssh host-key pinning matches the files and hostnames the MPI Operator creates.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

K8S_DIR = REPO / "docker" / "k8s"
IMAGE = "hvdkit-cpu:0.1.0"
USER_HOME = "/home/hvd"
# The oldest Kubernetes minor release still supported upstream when this was written (1.35, 1.36
# and 1.37 are): the manifests must work on all of them. kubernetes-validate >= 1.35 ships its schemas.
K8S_VERSION = "1.35"

# -- the MPI Operator's v2beta1 API (kubeflow/mpi-operator v0.8.2) ------------------------------------
# pkg/apis/kubeflow/v2beta1/types.go: the JSON names of MPIJobSpec, RunPolicy, SchedulingPolicy, ReplicaSpec.
MPIJOB_FIELDS = {"apiVersion", "kind", "metadata", "spec"}  # (+ status, written by the operator)
MPIJOB_SPEC_FIELDS = {"slotsPerWorker", "runLauncherAsWorker", "runPolicy", "mpiReplicaSpecs", "sshAuthMountPath",
                      "launcherCreationPolicy", "mpiImplementation"}
RUN_POLICY_FIELDS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                     "schedulingPolicy", "suspend", "managedBy"}
SCHEDULING_POLICY_FIELDS = {"minAvailable", "queue", "minResources", "priorityClass", "scheduleTimeoutSeconds"}
REPLICA_TYPES = {"Launcher", "Worker"}
REPLICA_SPEC_FIELDS = {"replicas", "template", "restartPolicy"}
# validation.go and the kubebuilder enums of types.go
CLEAN_POD_POLICIES = {"None", "Running", "All"}
MPI_IMPLEMENTATIONS = {"OpenMPI", "Intel", "MPICH"}
LAUNCHER_CREATION_POLICIES = {"AtStartup", "WaitForWorkersReady"}
REPLICA_RESTART_POLICIES = {"Never", "OnFailure"}
MANAGED_BY = {"kubeflow.org/mpi-operator", "kueue.x-k8s.io/multikueue"}
# pkg/controller/mpi_job_controller.go: sshVolumeItems, the files of the Secret <job>-ssh mounted at
# sshAuthMountPath (key ssh-privatekey -> id_rsa, key ssh-publickey -> id_rsa.pub and authorized_keys),
# and newConfigMap's hostfile lines for OpenMPI: "<job>-worker-<i>.<job>.<namespace>.svc[.<domain>] slots=N".
OPERATOR_SSH_FILES = {"id_rsa": "ssh-privatekey", "id_rsa.pub": "ssh-publickey", "authorized_keys": "ssh-publickey"}


def operator_hostfile_hosts(job: str, namespace: str, workers: int, cluster_domain: str = "") -> list[str]:
    suffix = f".{cluster_domain}" if cluster_domain else ""
    return [f"{job}-worker-{i}.{job}.{namespace}.svc{suffix}" for i in range(workers)]


# -- loading --------------------------------------------------------------------------------------
def _load() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(K8S_DIR.glob("*.yaml"))}


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return _load()


@pytest.fixture(scope="module")
def objects(k8s) -> list[dict]:
    return [d for name, docs in k8s.items() if name != "kustomization.yaml" for d in docs]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    """Every pod template of the manifests, by a readable name: {"Deployment/mlflow": template, ...}."""
    out = {}
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out[f"{kind}/{name}"] = o["spec"]["template"]
        elif kind == "CronJob":
            out[f"{kind}/{name}"] = o["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "Pod":
            out[f"{kind}/{name}"] = {"metadata": o["metadata"], "spec": o["spec"]}
        elif kind == "MPIJob":
            for rtype, rs in o["spec"]["mpiReplicaSpecs"].items():
                out[f"{kind}/{name}/{rtype}"] = rs["template"]
    return out


def _containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def _env_of(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _mpijob(objects) -> dict:
    return _one(objects, "MPIJob")


def _replica_container(job: dict, rtype: str) -> dict:
    (c,) = job["spec"]["mpiReplicaSpecs"][rtype]["template"]["spec"]["containers"]
    return c


# -- kustomization --------------------------------------------------------------------------------
def test_kustomization_lists_every_manifest_and_rewrites_the_image(k8s):
    (kz,) = k8s["kustomization.yaml"]
    assert kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kz["kind"] == "Kustomization"
    manifests = {p.name for p in K8S_DIR.iterdir() if p.suffix in (".yaml", ".yml")} - {"kustomization.yaml"}
    assert len(manifests) >= 4
    assert sorted(kz["resources"]) == sorted(manifests)
    assert len(kz["resources"]) == len(set(kz["resources"]))
    images = {i["name"]: i for i in kz["images"]}
    assert images["hvdkit-cpu"]["newTag"] == IMAGE.split(":")[1]
    # `kustomize edit set image hvdkit-cpu=...` and kustomize's image transformer reach an image
    # only inside a `containers`/`initContainers` list (of any kind: the MPIJob too). Every image
    # field of the manifests must sit there, and every hvdkit image be the one the entry names.
    found: list[tuple[str, str]] = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image":
                    found.append((path, v))
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for v in node:
                walk(v, f"{path}[]")

    for name, docs in k8s.items():
        for d in docs:
            walk(d, f"{name}:{d['kind']}")
    assert len(found) == 4, found  # postgres, mlflow, the MPIJob's launcher and worker
    for path, image in found:
        assert re.search(r"/(containers|initContainers)\[\]$", path), path
        assert image.split(":")[0] in images, image
        assert image == f"{image.split(':')[0]}:{images[image.split(':')[0]]['newTag']}", image
    assert sum(image == IMAGE for _, image in found) == 3


def test_comments_give_the_commands_that_work(objects):
    text = {p.name: p.read_text() for p in K8S_DIR.glob("*.yaml")}
    assert "kustomize edit set image hvdkit-cpu=registry.example.com/hvdkit-cpu:0.1.0" in text["kustomization.yaml"]
    assert "kubectl apply -k docker/k8s" in text["kustomization.yaml"]
    assert "kubectl create secret generic hvdkit-tracking --from-file=credentials=" in text["mpijob.yaml"]
    # the secrets mlflow.yaml's comment creates are the ones its pods read
    created = set(re.findall(r"kubectl create secret generic ([\w-]+)", "".join(text.values())))
    refs = set()
    for tmpl in pod_templates(objects).values():
        for c in _containers(tmpl["spec"]):
            refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        refs |= {v["secret"]["secretName"] for v in tmpl["spec"].get("volumes", []) if "secret" in v}
    assert refs == created == {"hvdkit-postgres-superuser", "hvdkit-mlflow-db", "hvdkit-mlflow", "hvdkit-tracking"}
    assert "StrictHostKeyChecking=no" not in "".join(text.values())
    assert "MLFLOW_TRACKING_PASSWORD" not in "".join(text.values())


# -- schemas --------------------------------------------------------------------------------------
def _validate(obj: dict) -> str:
    import kubernetes_validate

    return kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_validate_ships_the_version():
    import kubernetes_validate.utils as kvu

    assert K8S_VERSION in {kvu.major_minor(v) for v in kvu.all_versions()}, \
        f"kubernetes-validate lacks Kubernetes {K8S_VERSION} schemas: pip install 'kubernetes-validate>=1.35'"


def test_core_manifests_validate_against_the_kubernetes_schemas(objects):
    import kubernetes_validate

    core = [o for o in objects if not o["apiVersion"].startswith("kubeflow.org/")]
    kinds = sorted(o["kind"] for o in core)
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                     "PersistentVolumeClaim", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]
    for o in core:
        assert _validate(o) == K8S_VERSION, o["metadata"]["name"]
    # The validator does fail: an unknown field (strict), a wrong type, a missing required field.
    deploy = _one(objects, "Deployment")
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(deploy)
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(_one(objects, "NetworkPolicy", "mlflow-server"))
    bad["spec"]["ingress"][0]["ports"][0]["port"] = [5000]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)


def test_mpijob_pod_templates_validate_as_core_pod_templates(objects):
    import kubernetes_validate

    job = _mpijob(objects)
    for rtype, rs in job["spec"]["mpiReplicaSpecs"].items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{job['metadata']['name']}-{rtype.lower()}"}, "template": rs["template"]}
        assert _validate(wrapped) == K8S_VERSION, rtype
    # the MPIJob's own metadata is an ObjectMeta: validated on a core object
    assert _validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": job["metadata"]}) == K8S_VERSION
    bad = copy.deepcopy(job["spec"]["mpiReplicaSpecs"]["Worker"]["template"])
    bad["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad})


def mpijob_api_errors(job: dict) -> list[str]:
    """What the MPI Operator v2beta1 API (types.go field set, validation.go rules) rejects or
    silently drops (the CRD prunes unknown fields) in an MPIJob."""
    errs = []

    def unknown(obj, allowed, where):
        if not isinstance(obj, dict):
            errs.append(f"{where}: not an object")
            return
        errs.extend(f"{where}.{k}: unknown field" for k in sorted(set(obj) - allowed))

    def nonneg_int(v, where):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            errs.append(f"{where}: {v!r} is not a non-negative integer")

    unknown(job, MPIJOB_FIELDS | {"status"}, "")
    if job.get("apiVersion") != "kubeflow.org/v2beta1" or job.get("kind") != "MPIJob":
        errs.append(f"not a kubeflow.org/v2beta1 MPIJob: {job.get('apiVersion')} {job.get('kind')}")
    spec = job.get("spec", {})
    unknown(spec, MPIJOB_SPEC_FIELDS, "spec")
    if "slotsPerWorker" not in spec:
        errs.append("spec.slotsPerWorker: required (defaulted to 1, but say it)")
    else:
        nonneg_int(spec["slotsPerWorker"], "spec.slotsPerWorker")
    if "runLauncherAsWorker" in spec and not isinstance(spec["runLauncherAsWorker"], bool):
        errs.append("spec.runLauncherAsWorker: not a boolean")
    if not (isinstance(spec.get("sshAuthMountPath"), str) and spec["sshAuthMountPath"].startswith("/")):
        errs.append("spec.sshAuthMountPath: required, an absolute path")
    if spec.get("mpiImplementation", "OpenMPI") not in MPI_IMPLEMENTATIONS:
        errs.append(f"spec.mpiImplementation: {spec['mpiImplementation']!r} not in {sorted(MPI_IMPLEMENTATIONS)}")
    if spec.get("launcherCreationPolicy", "AtStartup") not in LAUNCHER_CREATION_POLICIES:
        errs.append(f"spec.launcherCreationPolicy: {spec['launcherCreationPolicy']!r}")
    rp = spec.get("runPolicy", {})
    unknown(rp, RUN_POLICY_FIELDS, "spec.runPolicy")
    if rp.get("cleanPodPolicy", "None") not in CLEAN_POD_POLICIES:
        errs.append(f"spec.runPolicy.cleanPodPolicy: {rp['cleanPodPolicy']!r} not in {sorted(CLEAN_POD_POLICIES)}")
    for f in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        if f in rp:
            nonneg_int(rp[f], f"spec.runPolicy.{f}")
    if "suspend" in rp and not isinstance(rp["suspend"], bool):
        errs.append("spec.runPolicy.suspend: not a boolean")
    if "managedBy" in rp and rp["managedBy"] not in MANAGED_BY:
        errs.append(f"spec.runPolicy.managedBy: {rp['managedBy']!r}")
    if "schedulingPolicy" in rp:
        unknown(rp["schedulingPolicy"], SCHEDULING_POLICY_FIELDS, "spec.runPolicy.schedulingPolicy")
    specs = spec.get("mpiReplicaSpecs")
    if not isinstance(specs, dict) or "Launcher" not in specs:
        errs.append("spec.mpiReplicaSpecs.Launcher: required")
        return errs
    errs.extend(f"spec.mpiReplicaSpecs.{k}: not a replica type" for k in sorted(set(specs) - REPLICA_TYPES))
    for rtype, rs in specs.items():
        where = f"spec.mpiReplicaSpecs.{rtype}"
        unknown(rs, REPLICA_SPEC_FIELDS, where)
        if "replicas" not in rs:
            errs.append(f"{where}.replicas: required")
        else:
            nonneg_int(rs["replicas"], f"{where}.replicas")
        if rs.get("restartPolicy") not in REPLICA_RESTART_POLICIES:
            errs.append(f"{where}.restartPolicy: {rs.get('restartPolicy')!r} not in {sorted(REPLICA_RESTART_POLICIES)}")
        pod = rs.get("template", {}).get("spec", {})
        if not pod.get("containers"):
            errs.append(f"{where}.template.spec.containers: required")
        if "restartPolicy" in pod:
            errs.append(f"{where}.template.spec.restartPolicy: overridden by the replica's restartPolicy")
    if specs["Launcher"].get("replicas") != 1:
        errs.append("spec.mpiReplicaSpecs.Launcher.replicas: must be 1")
    if "Worker" in specs and not specs["Worker"].get("replicas", 0) >= 1:
        errs.append("spec.mpiReplicaSpecs.Worker.replicas: must be >= 1")
    # pod hostnames <job>-worker-<n> must be DNS-1035 labels
    last = f"{job.get('metadata', {}).get('name', '')}-worker-{max(specs.get('Worker', {}).get('replicas', 1), 1) - 1}"
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", last):
        errs.append(f"metadata.name: worker hostname {last!r} is not a DNS-1035 label")
    return errs


def test_mpijob_fields_are_the_operators_v2beta1_api(objects):
    job = _mpijob(objects)
    assert mpijob_api_errors(job) == []
    # The checker does fail, on each kind of mistake:
    cases = {
        "spec.slotPerWorker: unknown field": lambda j: j["spec"].update(slotPerWorker=1),
        "spec.runPolicy.cleanupPolicy: unknown field": lambda j: j["spec"]["runPolicy"].update(cleanupPolicy="All"),
        "spec.mpiReplicaSpecs.Worker.restart: unknown field": lambda j: j["spec"]["mpiReplicaSpecs"]["Worker"].update(restart="Never"),
        "spec.mpiReplicaSpecs.Master: not a replica type": lambda j: j["spec"]["mpiReplicaSpecs"].update(Master={}),
        "spec.runPolicy.cleanPodPolicy: 'Always'": lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Always"),
        "spec.mpiReplicaSpecs.Launcher.replicas: must be 1": lambda j: j["spec"]["mpiReplicaSpecs"]["Launcher"].update(replicas=2),
        "spec.mpiReplicaSpecs.Worker.restartPolicy: 'Always'": lambda j: j["spec"]["mpiReplicaSpecs"]["Worker"].update(restartPolicy="Always"),
        "spec.mpiImplementation: 'openmpi'": lambda j: j["spec"].update(mpiImplementation="openmpi"),
        "metadata.name: worker hostname": lambda j: j["metadata"].update(name="HVDKIT"),
    }
    for expected, mutate in cases.items():
        bad = copy.deepcopy(job)
        mutate(bad)
        errs = mpijob_api_errors(bad)
        assert any(e.startswith(expected) for e in errs), (expected, errs)


def test_mpijob_runs_the_recipe_on_the_workers(objects):
    job = _mpijob(objects)
    spec = job["spec"]
    assert spec["sshAuthMountPath"] == f"{USER_HOME}/.ssh"
    launcher = spec["mpiReplicaSpecs"]["Launcher"]
    worker = spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1 and worker["replicas"] == 2
    lc, wc = _replica_container(job, "Launcher"), _replica_container(job, "Worker")
    assert lc["image"] == wc["image"] == IMAGE
    args = lc["args"]
    assert args[:2] == ["hvdkit", "run"] and (REPO / Path(args[2]).relative_to("/opt/hvdkit")).is_file()
    assert args[args.index("--hostfile") + 1] == "/etc/mpi/hostfile"
    assert int(args[args.index("-np") + 1]) == worker["replicas"] * spec["slotsPerWorker"]
    assert wc["args"] == ["sshd"] and wc["readinessProbe"]["tcpSocket"]["port"] == 2222
    assert {"name": "ssh", "containerPort": 2222} in wc["ports"]
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["runPolicy"]["suspend"] is True  # started by `kubectl patch` once the tracking secret exists
    for rs in (launcher, worker):
        sc = rs["template"]["spec"]["securityContext"]
        assert sc["runAsUser"] == 1000 and sc["runAsGroup"] == 1000 and sc["fsGroup"] == 1000
        assert sc["runAsNonRoot"] is True


def test_spool_and_checkpoints_live_on_the_shared_claim(objects):
    job = _mpijob(objects)
    pvc = _one(objects, "PersistentVolumeClaim", "hvdkit-jobs")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # launcher and workers on different nodes
    mounts = {}
    for rtype in ("Launcher", "Worker"):
        pod = job["spec"]["mpiReplicaSpecs"][rtype]["template"]["spec"]
        (c,) = pod["containers"]
        vols = {v["name"]: v for v in pod["volumes"]}
        (m,) = [m for m in c["volumeMounts"] if vols[m["name"]].get("persistentVolumeClaim")]
        assert vols[m["name"]]["persistentVolumeClaim"]["claimName"] == "hvdkit-jobs"
        assert not m.get("readOnly") and "subPath" not in m
        mounts[rtype] = m["mountPath"]
        # horovodrun starts every rank in the launcher's working directory, where the spool
        # (./hvdkit-spool, written by rank 0 on a worker) goes: the claim, on every pod
        assert c["workingDir"] == m["mountPath"], rtype
    assert mounts["Launcher"] == mounts["Worker"] == f"{USER_HOME}/jobs"
    args = _replica_container(job, "Launcher")["args"]
    (ckpt,) = [a.split("=", 1)[1] for a in args if a.startswith("checkpoint.dir=")]
    assert Path(ckpt).is_absolute() and Path(ckpt).is_relative_to(mounts["Launcher"]) and Path(ckpt) != Path(mounts["Launcher"])


def test_mpijob_tracks_to_the_in_cluster_server(objects):
    job = _mpijob(objects)
    svc_names = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    deploy = _one(objects, "Deployment", "mlflow")
    (mc,) = deploy["spec"]["template"]["spec"]["containers"]
    menv = _env_of(mc)
    for rtype in ("Launcher", "Worker"):
        env = _env_of(_replica_container(job, rtype))
        host, port = re.fullmatch(r"http://([\w.-]+):(\d+)", env["MLFLOW_TRACKING_URI"]).groups()
        svc = svc_names[host.split(".")[0]]
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        assert f"{host}:{port}" in menv["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert mc["image"] == IMAGE and mc["args"] == ["mlflow-server"]
    assert menv["MLFLOW_HOST"] == "0.0.0.0" and menv["MLFLOW_PORT"] == "5000"
    assert 5000 in [p["containerPort"] for p in mc["ports"]] and mc["readinessProbe"]["httpGet"]["path"] == "/health"
    pvc = _one(objects, "PersistentVolumeClaim", "mlflow-artifacts")
    vols = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in mc["volumeMounts"] if m["mountPath"] == menv["MLFLOW_ARTIFACTS_DESTINATION"])
    assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


# -- credentials ----------------------------------------------------------------------------------
SECRETISH = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|_KEY$|ACCESS_KEY|BACKEND_STORE_URI|DATABASE_URI", re.I)
URI_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def test_no_credential_is_inline(objects):
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are created with kubectl, not shipped"
    for cm in (o for o in objects if o["kind"] == "ConfigMap"):
        for text in cm.get("data", {}).values():
            assert not URI_WITH_PASSWORD.search(text)
    checked = 0
    for where, tmpl in pod_templates(objects).items():
        for c in _containers(tmpl["spec"]):
            for e in c.get("env", []):
                if "value" in e:
                    assert not URI_WITH_PASSWORD.search(e["value"]), (where, e["name"])
                if SECRETISH.search(e["name"]) and e["name"] not in ("SSHD_HOST_KEY", "HVDKIT_SSH_HOST_PUBKEY"):
                    # a value from a Secret, never inline (SSHD_HOST_KEY etc. are paths to files)
                    assert set(e) == {"name", "valueFrom"} and set(e["valueFrom"]) == {"secretKeyRef"}, (where, e)
                    checked += 1
            assert not c.get("envFrom"), where
            assert not any(SECRETISH.search(a) and "=" in a for a in c.get("args", []) + c.get("command", [])), where
    assert checked == 4  # postgres: superuser + the role's; mlflow: the role's + admin; none on the job's pods


def test_training_credentials_come_from_a_file(objects):
    job = _mpijob(objects)
    for rtype in ("Launcher", "Worker"):
        pod = job["spec"]["mpiReplicaSpecs"][rtype]["template"]["spec"]
        (c,) = pod["containers"]
        env = _env_of(c)
        assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} & set(env)
        vols = {v["name"]: v for v in pod["volumes"]}
        (m,) = [m for m in c["volumeMounts"] if vols[m["name"]].get("secret", {}).get("secretName") == "hvdkit-tracking"]
        sec = vols[m["name"]]["secret"]
        assert m["readOnly"] is True
        # ~/.mlflow/credentials, whichever way the key lands there
        if "subPath" in m:
            path = sec["items"][[i["key"] for i in sec["items"]].index("credentials")]["path"]
            assert m["mountPath"] == f"{USER_HOME}/.mlflow/credentials" and m["subPath"] == path
        else:
            assert m["mountPath"] == f"{USER_HOME}/.mlflow"
            assert {"key": "credentials", "path": "credentials"} in [{k: i[k] for k in ("key", "path")} for i in sec["items"]]
        assert [i["key"] for i in sec["items"]] == ["credentials"]
        mode = next((i["mode"] for i in sec["items"] if "mode" in i), sec.get("defaultMode"))
        assert mode == 0o400
        # the kubelet adds group read for fsGroup: 0440, root:1000; hvdkit refuses mode & 0o027
        assert (mode | 0o440) & 0o027 == 0 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


@pytest.mark.system
def test_mlflow_logs_in_to_postgres_as_an_ordinary_role(objects):
    pg = _one(objects, "StatefulSet", "mlflow-postgres")
    pg_pod = pg["spec"]["template"]["spec"]
    (pc,) = pg_pod["containers"]
    penv = _env_of(pc)
    deploy = _one(objects, "Deployment", "mlflow")
    (mc,) = deploy["spec"]["template"]["spec"]["containers"]
    menv = _env_of(mc)
    superuser = penv["POSTGRES_USER"]
    assert superuser == "postgres" and "POSTGRES_DB" not in penv  # no database made by the image for the superuser
    assert penv["POSTGRES_PASSWORD"]["secretKeyRef"] == {"name": "hvdkit-postgres-superuser", "key": "password"}
    assert penv["PGDATA"].startswith(pc["volumeMounts"][0]["mountPath"] + "/")  # a subdirectory of the volume
    # the server: the URI's parts, the role's own password, never the superuser's
    assert "MLFLOW_BACKEND_STORE_URI" not in menv
    assert menv["MLFLOW_DB_USER"] == "mlflow" != superuser
    assert menv["MLFLOW_DB_NAME"] == "mlflow"
    svc = _one(objects, "Service", menv["MLFLOW_DB_HOST"])
    assert svc["spec"]["selector"].items() <= pg["spec"]["template"]["metadata"]["labels"].items()
    assert int(menv["MLFLOW_DB_PORT"]) in [p["port"] for p in svc["spec"]["ports"]]
    assert menv["MLFLOW_DB_PASSWORD"] == penv["MLFLOW_DB_PASSWORD"] == {"secretKeyRef": {"name": "hvdkit-mlflow-db", "key": "password"}}
    assert "hvdkit-postgres-superuser" not in yaml.safe_dump(deploy)
    # the init script: mounted where the official image runs it, executable, creating exactly the role
    vols = {v["name"]: v for v in pg_pod["volumes"]}
    (m,) = [m for m in pc["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d"]
    cm_ref = vols[m["name"]]["configMap"]
    assert cm_ref["defaultMode"] == 0o555
    cm = _one(objects, "ConfigMap", cm_ref["name"])
    (script_name,) = cm["data"]
    assert script_name.endswith(".sh")
    script = cm["data"][script_name]
    assert script.startswith("#!/usr/bin/env bash\n")
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    role = penv.get("MLFLOW_DB_USER", "mlflow")
    assert role == menv["MLFLOW_DB_USER"] and "MLFLOW_DB_USER=" not in script
    (create_role,) = [line for line in script.splitlines() if "CREATE ROLE" in line]
    options = re.search(r"CREATE ROLE %I (.*) PASSWORD %L", create_role).group(1).split()
    assert "LOGIN" in options and not {"SUPERUSER", "CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS"} & set(options)
    assert re.search(r"CREATE DATABASE %I OWNER %I', :'db', :'role'\)", script)
    assert "\\getenv pw MLFLOW_DB_PASSWORD" in script and "$MLFLOW_DB_PASSWORD" not in script.split("<<")[1]
    assert not re.search(r"\bGRANT\b|ALTER ROLE|\bSUPERUSER\b(?<!NOSUPERUSER)", script.split("<<")[1])


def test_compose_and_k8s_share_the_postgres_init_script(objects):
    """One script for both: docker/postgres-init/ is what compose mounts, the ConfigMap carries the same bytes."""
    data = _one(objects, "ConfigMap", "mlflow-postgres-init")["data"]
    (name,) = data
    assert data[name] == (REPO / "docker" / "postgres-init" / name).read_text()


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found and int(found[-1].parts[-3]) >= 15 else None  # \getenv: psql >= 15


@pytest.mark.system
@pytest.mark.skipif(os.geteuid() != 0 or _pg_bin() is None, reason="needs root and PostgreSQL >= 15 (.ci/postgres installs it)")
def test_init_script_creates_the_role_on_a_real_server(objects):
    """The ConfigMap's script, run the way the official image runs it (as the superuser, local socket)."""
    script = _one(objects, "ConfigMap", "mlflow-postgres-init")["data"]["10-mlflow-role.sh"]
    pg_bin = _pg_bin()
    pw = "p@ss:w/rd %41 'q\" \\x;--"  # everything that breaks a naive URI or SQL string
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres OS user")
    d = Path(tempfile.mkdtemp(prefix="hvdkit-pginit-"))
    try:
        shutil.chown(d, "postgres")
        (d / "init.sh").write_text(script)
        (d / "init.sh").chmod(0o555)
        env = {"PATH": f"{pg_bin}:/usr/bin:/bin", "LC_ALL": "C", "PGHOST": str(d), "PGPORT": "54329"}

        def as_pg(*cmd, extra=None, check=True):
            return subprocess.run(["runuser", "-u", "postgres", "--", "env", *(f"{k}={v}" for k, v in {**env, **(extra or {})}.items()),
                                   *cmd], capture_output=True, text=True, timeout=120, check=check)

        as_pg("initdb", "-D", str(d / "data"), "-U", "postgres", "-A", "trust")
        (d / "data" / "pg_hba.conf").write_text("local all postgres trust\nlocal all all scram-sha-256\n")
        as_pg("pg_ctl", "-D", str(d / "data"), "-l", str(d / "log"), "-w", "-o",
              f"-c listen_addresses='' -k {d} -p 54329", "start")
        try:
            r = as_pg(str(d / "init.sh"), extra={"POSTGRES_USER": "postgres", "MLFLOW_DB_PASSWORD": pw})
            assert "role mlflow (ordinary) owns database mlflow" in r.stdout
            q = as_pg("psql", "-XAtq", "-U", "postgres", "-d", "postgres", "-c",
                      "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin,"
                      " (SELECT count(*) FROM pg_auth_members WHERE member = r.oid),"
                      " (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow')"
                      " FROM pg_roles r WHERE rolname = 'mlflow'").stdout.strip()
            assert q == "f|f|f|f|f|t|0|mlflow"
            # the role logs in with exactly that password and owns its database
            ok = as_pg("psql", "-XAtq", "-U", "mlflow", "-d", "mlflow", "-c", "CREATE TABLE t (x int); SELECT current_user",
                       extra={"PGPASSWORD": pw})
            assert ok.stdout.strip() == "mlflow"
            no = as_pg("psql", "-XAtq", "-U", "mlflow", "-d", "mlflow", "-c", "SELECT 1", extra={"PGPASSWORD": pw[:-1]},
                       check=False)
            assert no.returncode != 0 and "password authentication failed" in no.stderr
            # without a password it stops, naming the fix
            r = as_pg(str(d / "init.sh"), extra={"POSTGRES_USER": "postgres", "MLFLOW_DB_PASSWORD": ""}, check=False)
            assert r.returncode != 0 and "MLFLOW_DB_PASSWORD" in r.stderr
            assert as_pg("psql", "-XAtq", "-U", "postgres", "-d", "postgres", "-c",
                         "SELECT count(*) FROM pg_roles WHERE rolname = 'mlflow'").stdout.strip() == "1"
        finally:
            as_pg("pg_ctl", "-D", str(d / "data"), "-m", "fast", "-w", "stop", check=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- Pod Security Standard "restricted" -----------------------------------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline + restricted)
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_pss_violations(template: dict) -> list[str]:
    """What the "restricted" Pod Security Standard (which includes "baseline") refuses in a pod template."""
    spec, meta = template["spec"], template.get("metadata", {})
    psc = spec.get("securityContext", {})
    errs = []
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(f):
            errs.append(f"{f}: true")
    for v in spec.get("volumes", []):
        types = set(v) - {"name"}
        if not types <= RESTRICTED_VOLUME_TYPES:
            errs.append(f"volume {v['name']}: type {sorted(types - RESTRICTED_VOLUME_TYPES)}")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            errs.append(f"sysctl {s['name']}")
    for k, v in meta.get("annotations", {}).items():
        if k.startswith("container.apparmor.security.beta.kubernetes.io/") and v not in ("runtime/default",) and not v.startswith("localhost/"):
            errs.append(f"annotation {k}: {v}")

    def selinux(sc, where):
        o = sc.get("seLinuxOptions", {})
        if o.get("type", "") not in SELINUX_TYPES or o.get("user") or o.get("role"):
            errs.append(f"{where}: seLinuxOptions {o}")

    def seccomp_ok(sc):
        return sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")

    selinux(psc, "pod")
    if psc.get("appArmorProfile", {}).get("type") == "Unconfined":
        errs.append("pod: appArmorProfile Unconfined")
    if psc.get("runAsUser") == 0:
        errs.append("pod: runAsUser 0")
    if psc.get("windowsOptions", {}).get("hostProcess"):
        errs.append("pod: hostProcess")
    containers = _containers(spec)
    if not containers:
        errs.append("no containers")
    for c in containers:
        sc, name = c.get("securityContext", {}), f"container {c['name']}"
        if sc.get("privileged"):
            errs.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            errs.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            errs.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            errs.append(f"{name}: capabilities add {caps['add']}")
        if not (sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
            errs.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            errs.append(f"{name}: runAsUser 0")
        if not (seccomp_ok(sc) or (seccomp_ok(psc) and "seccompProfile" not in sc)):
            errs.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("procMount", "Default") != "Default":
            errs.append(f"{name}: procMount {sc['procMount']}")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            errs.append(f"{name}: appArmorProfile Unconfined")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            errs.append(f"{name}: hostProcess")
        selinux(sc, name)
        for p in c.get("ports", []):
            if p.get("hostPort"):
                errs.append(f"{name}: hostPort {p['hostPort']}")
    return errs


def test_every_pod_meets_the_restricted_pod_security_standard(objects):
    templates = pod_templates(objects)
    assert sorted(templates) == ["Deployment/mlflow", "MPIJob/hvdkit-digits/Launcher", "MPIJob/hvdkit-digits/Worker",
                                 "StatefulSet/mlflow-postgres"]
    for where, tmpl in templates.items():
        assert restricted_pss_violations(tmpl) == [], where
        psc = tmpl["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in _containers(tmpl["spec"]):
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}, where
        assert tmpl["spec"]["automountServiceAccountToken"] is False, where  # none of them talks to the API server
    uids = {where: t["spec"]["securityContext"]["runAsUser"] for where, t in templates.items()}
    assert uids == {"Deployment/mlflow": 1000, "MPIJob/hvdkit-digits/Launcher": 1000,
                    "MPIJob/hvdkit-digits/Worker": 1000, "StatefulSet/mlflow-postgres": 999}
    assert templates["StatefulSet/mlflow-postgres"]["spec"]["securityContext"]["fsGroup"] == 999
    # The checker does fail:
    worker = templates["MPIJob/hvdkit-digits/Worker"]
    cases = {
        "container worker: allowPrivilegeEscalation is not false":
            lambda t: t["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "container worker: capabilities do not drop ALL":
            lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "container worker: capabilities add":
            lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "container worker: runAsNonRoot is not true": lambda t: t["spec"]["securityContext"].pop("runAsNonRoot"),
        "container worker: seccompProfile": lambda t: t["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "container worker: privileged": lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True),
        "hostNetwork: true": lambda t: t["spec"].update(hostNetwork=True),
        "volume host: type ['hostPath']": lambda t: t["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        "container worker: hostPort 2222": lambda t: t["spec"]["containers"][0]["ports"][0].update(hostPort=2222),
        "pod: runAsUser 0": lambda t: t["spec"]["securityContext"].update(runAsUser=0),
    }
    for expected, mutate in cases.items():
        bad = copy.deepcopy(worker)
        mutate(bad)
        errs = restricted_pss_violations(bad)
        assert any(e.startswith(expected) for e in errs), (expected, errs)


# -- NetworkPolicies ------------------------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        if (op == "In" and labels.get(k) not in vals) or (op == "NotIn" and k in labels and labels[k] in vals) \
                or (op == "Exists" and k not in labels) or (op == "DoesNotExist" and k in labels):
            return False
    return True


def reachable_from(policies: list[dict], pods: dict[str, dict], target: str, port: int, protocol: str = "TCP") -> set[str] | None:
    """Which of ``pods`` (name -> labels, one namespace) may open ``protocol``/``port`` to ``target``
    under ``policies``; None if no policy isolates the target (everyone may)."""
    isolating = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], pods[target])]
    if not isolating:
        return None
    allowed: set[str] = set()
    for p in isolating:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(pp.get("protocol", "TCP") == protocol and pp.get("port", port) == port
                                             and port <= pp.get("endPort", port) for pp in ports):
                continue
            peers = rule.get("from")
            if peers is None:  # from anywhere
                allowed |= set(pods) | {"<outside>"}
                continue
            for peer in peers:
                if "ipBlock" in peer or "namespaceSelector" in peer:
                    allowed.add("<outside>")
                    continue
                allowed |= {name for name, labels in pods.items() if _selects(peer["podSelector"], labels)}
    return allowed


def test_network_policies_let_only_the_right_pods_in(objects):
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    templates = pod_templates(objects)
    pods = {
        "launcher": templates["MPIJob/hvdkit-digits/Launcher"]["metadata"]["labels"],
        "worker": templates["MPIJob/hvdkit-digits/Worker"]["metadata"]["labels"],
        "mlflow": templates["Deployment/mlflow"]["metadata"]["labels"],
        "postgres": templates["StatefulSet/mlflow-postgres"]["metadata"]["labels"],
        # other workloads of the namespace: an unlabelled pod, another hvdkit job's pod
        "stranger": {"app": "web"},
        "other-job": {"app.kubernetes.io/part-of": "hvdkit", "app.kubernetes.io/instance": "other",
                      "app.kubernetes.io/component": "worker"},
    }
    job = {"launcher", "worker"}
    # the default deny covers every pod of the app, with no rule of its own
    (deny,) = [p for p in policies if p["metadata"]["name"] == "hvdkit-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    for name in ("launcher", "worker", "mlflow", "postgres", "other-job"):
        assert _selects(deny["spec"]["podSelector"], pods[name]), name
    # who reaches what
    assert reachable_from(policies, pods, "worker", 2222) == job  # sshd
    wc = _replica_container(_mpijob(objects), "Worker")
    assert wc["ports"][0]["containerPort"] == 2222
    for port in (1024, 34567, 65535):  # Gloo's, Horovod's driver/task services: dynamic
        assert reachable_from(policies, pods, "worker", port) == job
        assert reachable_from(policies, pods, "launcher", port) == job
    assert reachable_from(policies, pods, "worker", 2222, "UDP") == set()
    assert reachable_from(policies, pods, "mlflow", 5000) == job
    assert reachable_from(policies, pods, "mlflow", 5432) == set()
    assert reachable_from(policies, pods, "postgres", 5432) == {"mlflow"}
    assert reachable_from(policies, pods, "postgres", 2222) == set()
    assert reachable_from(policies, pods, "other-job", 2222) == set()
    assert reachable_from(policies, pods, "stranger", 80) is None  # not ours: untouched
    # the ports the policies open are the ones the servers listen on
    (mc,) = templates["Deployment/mlflow"]["spec"]["containers"]
    (pc,) = templates["StatefulSet/mlflow-postgres"]["spec"]["containers"]
    assert mc["ports"][0]["containerPort"] == 5000 and pc["ports"][0]["containerPort"] == 5432
    # the MLflow clients are exactly the pods carrying the client label, the job's
    assert {n for n, labels in pods.items() if labels.get("hvdkit/mlflow-client") == "true"} == job


# -- ssh host keys --------------------------------------------------------------------------------
def _ssh_pattern_match(patterns: str, host: str) -> bool:
    """OpenSSH's `Host` matching for patterns without negation: * and ? only, case-insensitive."""
    pats = patterns.split()
    assert all(not p.startswith("!") and not set(p) & set("[]") for p in pats), patterns
    return any(fnmatch.fnmatchcase(host.lower(), p.lower()) for p in pats)


def test_ssh_host_key_is_the_operators_job_key_and_pinned_for_the_workers(objects):
    job = _mpijob(objects)
    mount = job["spec"]["sshAuthMountPath"]
    name = job["metadata"]["name"]
    lenv = _env_of(_replica_container(job, "Launcher"))
    wenv = _env_of(_replica_container(job, "Worker"))
    # the files the operator mounts (sshVolumeItems): id_rsa is its private key, id_rsa.pub its public key
    assert wenv["SSHD_HOST_KEY"] == f"{mount}/id_rsa" and OPERATOR_SSH_FILES["id_rsa"] == "ssh-privatekey"
    for env in (lenv, wenv):
        assert env["HVDKIT_SSH_HOST_PUBKEY"] == f"{mount}/id_rsa.pub" and OPERATOR_SSH_FILES["id_rsa.pub"] == "ssh-publickey"
        assert env["HVDKIT_SSH_HOSTS"] == lenv["HVDKIT_SSH_HOSTS"]
    assert "SSHD_HOST_KEY" not in lenv  # the launcher runs no sshd
    # nothing of ours mounted over the operator's ssh directory
    for rtype in ("Launcher", "Worker"):
        for m in _replica_container(job, rtype).get("volumeMounts", []):
            assert not (m["mountPath"] + "/").startswith(mount + "/"), m
    # the patterns cover every host the operator writes into /etc/mpi/hostfile, with or without
    # a cluster domain, in any namespace ...
    patterns = lenv["HVDKIT_SSH_HOSTS"]
    workers = job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    hosts = [*operator_hostfile_hosts(name, "default", workers), *operator_hostfile_hosts(name, "ml-team", workers, "cluster.local")]
    assert len(hosts) == 2 * workers
    for h in hosts:
        assert _ssh_pattern_match(patterns, h), h
    # ... and no other job's hosts, nor the launcher (which runs no sshd)
    for h in [*operator_hostfile_hosts("other", "default", 2), f"{name}-launcher.{name}.default.svc", "mlflow"]:
        assert not _ssh_pattern_match(patterns, h), h
