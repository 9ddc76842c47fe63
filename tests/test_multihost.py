"""Real multi-host training over ssh: two "hosts" on this machine, each a network namespace with
its own address, hostname and sshd (tests/_netns.py), joined by a bridge to the launcher; a 2-host
job, and the bad-host cases (unreachable, refused key, unknown or changed host key, too few slots).

Needs root (`ip netns`); skipped only where network namespaces are not permitted.
"""

from __future__ import annotations

import time

import pytest

from _netns import SUBNET, Cluster, leftovers as _leftovers, netns_cluster
from conftest import REPO, hvdkit

pytestmark = [pytest.mark.system, pytest.mark.horovod]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    with netns_cluster(tmp_path_factory.mktemp("multihost")) as c:
        yield c


def _run(c: Cluster, name: str, *args: str, timeout: int = 300, env: dict[str, str] | None = None):
    work = c.tmp / name
    work.mkdir()
    return hvdkit(["run", str(REPO / "recipes" / "digits.yaml"), *args, "--framework", "torch", "epochs=2",
                   "log.progress=false", f"checkpoint.dir={work / 'ckpt'}"], cwd=work, env=env or c.env, timeout=timeout)


def test_two_hosts_train_and_the_parent_run_records_both(cluster):
    before = {o: cluster.accepted(o) for o in cluster.sshd}
    res = _run(cluster, "job", "-np", "2", "-H", f"{SUBNET}.2:1,{SUBNET}.3:1", "-i", str(cluster.key))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    # both ranks ran on their own host: each sshd accepted the launcher's key (probe + task + rank)
    assert all(cluster.accepted(o) > before[o] for o in cluster.sshd), {o: cluster.accepted(o) for o in cluster.sshd}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("hvdkit")
    runs = client.search_runs([exp.experiment_id], max_results=10)
    parents = [r for r in runs if r.data.tags.get("hvdkit.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("hvdkit.role") == "rank"]
    assert len(parents) == 1 and len(children) == 2, [r.data.tags.get("hvdkit.role") for r in runs]
    assert parents[0].data.tags["hvdkit.hosts"].split(",") == [f"{SUBNET}.2", f"{SUBNET}.3"]
    assert parents[0].data.tags["hvdkit.world_size"] == "2"
    assert {c.data.tags["hvdkit.rank"]: c.data.tags["hvdkit.host"] for c in children} == {"0": f"{SUBNET}.2",
                                                                                          "1": f"{SUBNET}.3"}
    assert all(c.data.tags["hvdkit.local_rank"] == "0" for c in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "samples_per_sec" in parents[0].data.metrics
    # every ssh hvdkit and horovodrun ran checked the host key (no StrictHostKeyChecking=no) in batch mode
    ssh_lines = cluster.ssh_log.read_text().splitlines()
    assert len(ssh_lines) >= 6 and all("BatchMode=yes" in ln for ln in ssh_lines), ssh_lines
    assert not any("StrictHostKeyChecking" in ln for ln in ssh_lines), ssh_lines
    assert not cluster.settle(), "ssh sessions or ranks left running on the hosts"
    assert not _leftovers(str(cluster.tmp / "job"))


# (case, hosts, which host fails, what ssh says, what the fix names)
BAD_HOSTS = [
    ("unreachable-host", f"{SUBNET}.2:1,{SUBNET}.4:1", [f"{SUBNET}.4"], "Connection refused", "-p PORT"),
    ("refused-key", f"{SUBNET}.2:1,{SUBNET}.3:1", [f"{SUBNET}.2", f"{SUBNET}.3"], "Permission denied", "-i KEY"),
    ("unknown-host-key", f"{SUBNET}.2:1,{SUBNET}.3:1", [f"{SUBNET}.3"], "Host key verification failed",
     f"ssh-keyscan -p 22 {SUBNET}.3"),
    ("changed-host-key", f"{SUBNET}.2:1,{SUBNET}.3:1", [f"{SUBNET}.3"], "host key changed",
     f"ssh-keygen -R {SUBNET}.3"),
]


@pytest.mark.parametrize("case, hosts, bad, needle, fix", BAD_HOSTS, ids=[c[0] for c in BAD_HOSTS])
def test_bad_host_is_one_clear_line_and_nothing_starts(cluster, case, hosts, bad, needle, fix):
    before = {o: cluster.accepted(o) for o in cluster.sshd}
    env = dict(cluster.env)
    key = cluster.wrong_key if case == "refused-key" else cluster.key
    if case == "unknown-host-key":  # the launcher knows 10.77.0.2's key only
        env["HVDKIT_TEST_SSH_CONFIG"] = cluster.ssh_config(case, f"{SUBNET}.2 {cluster.host_keys[2]}\n")
    elif case == "changed-host-key":  # 10.77.0.3 answers with another key than the one on record
        env["HVDKIT_TEST_SSH_CONFIG"] = cluster.ssh_config(
            case, f"{SUBNET}.2 {cluster.host_keys[2]}\n{SUBNET}.3 {cluster.host_keys[2]}\n")
    t0 = time.monotonic()
    res = _run(cluster, case, "-np", "2", "-H", hosts, "-i", str(key), timeout=120, env=env)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert all(h in errors[0] for h in bad) and needle in errors[0] and "fix:" in errors[0], errors[0]
    assert fix in errors[0], errors[0]
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60
    assert not list((cluster.tmp / case).glob("ckpt/*")), "training started"
    if case == "unreachable-host":  # the reachable host saw the check only, no task or rank
        assert cluster.accepted(2) == before[2] + 1
    if case.endswith("host-key"):  # the host with the unchecked key got no connection at all
        assert cluster.accepted(3) == before[3] and cluster.accepted(2) == before[2] + 1
    assert not cluster.settle() and not _leftovers(str(cluster.tmp / case)), "something was left running"


def test_fewer_slots_than_ranks_names_the_hosts_and_starts_nothing(cluster):
    before = {o: cluster.accepted(o) for o in cluster.sshd}
    res = _run(cluster, "slots", "-np", "3", "-H", f"{SUBNET}.2:1,{SUBNET}.3:1", "-i", str(cluster.key), timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("hvdkit: error:") and "-np 3" in err and f"{SUBNET}.2:1,{SUBNET}.3:1" in err and "fix:" in err, err
    assert {o: cluster.accepted(o) for o in cluster.sshd} == before, "a host was contacted"
    assert not cluster.settle() and not _leftovers(str(cluster.tmp / "slots"))
