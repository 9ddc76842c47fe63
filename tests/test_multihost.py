"""Real multi-host training over ssh: two "hosts" on this machine, each a network namespace with
its own address, hostname and sshd, joined by a bridge to the launcher (the root namespace).

    root ns   hvdkmh0 (bridge) 10.77.0.1 ── veth ── hvdkit-mh2: hvdkmh0 10.77.0.2, sshd :22
                                         ── veth ── hvdkit-mh3: hvdkmh0 10.77.0.3, sshd :22
                                         ── veth ── hvdkit-mh4: hvdkmh0 10.77.0.4, no sshd

The namespaces share this machine's filesystem, so the venv path is the same on every "host".
Every interface is named hvdkmh0 in its namespace: horovodrun picks the interface name the hosts
have in common and looks up the launcher's own address on an interface of that name (its Gloo
rendezvous server). Each host resolves its own hostname to its bridge address
(/etc/netns/<ns>/hosts, bound over /etc/hosts by `ip netns exec`), as cluster nodes do; with the
hostname on 127.0.0.1 Horovod 0.28.1's process-set Gloo context binds to loopback and hvd.init()
fails across hosts (InitializeForProcessSet ignores HOROVOD_GLOO_IFACE).

Needs root (`ip netns`); skipped only where network namespaces are not permitted. sshd comes from
`.ci/netns`, which the fixture runs when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, hvdkit, worker_env

pytestmark = pytest.mark.horovod

BRIDGE = "hvdkmh0"  # also the interface's name inside each namespace
SUBNET = "10.77.0"
LAUNCHER_IP = f"{SUBNET}.1"
HOSTS = {2: True, 3: True, 4: False}  # last octet -> runs sshd
NETNS_ETC = Path("/etc/netns")
PRIVSEP = Path("/run/sshd")  # sshd's privilege-separation directory (Debian's package makes it at boot)


def _ns(octet: int) -> str:
    return f"hvdkit-mh{octet}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _netns_pids(ns: str) -> set[int]:
    res = _ip("netns", "pids", ns, check=False)
    return {int(p) for p in res.stdout.split()} if res.returncode == 0 else set()


def _kill(pids, wait_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, by process id."""
    pids = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _teardown_network(created_etc: bool) -> list[str]:
    """Kill what runs in our namespaces, delete them, the bridge and /etc/netns entries. Idempotent;
    returns what could not be removed."""
    problems = []
    for octet in HOSTS:
        ns = _ns(octet)
        _kill(_netns_pids(ns))
        if _ip("netns", "del", ns, check=False).returncode != 0 and ns in _ip("netns", "list").stdout.split():
            problems.append(f"netns {ns}")
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        _ip("link", "del", f"{BRIDGE}-v{octet}", check=False)  # gone with its peer's namespace already
    _ip("link", "del", BRIDGE, check=False)
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        problems.append(f"link {BRIDGE}")
    if created_etc:
        try:
            NETNS_ETC.rmdir()
        except OSError:
            pass
    return problems


def _leftovers(marker: str) -> list[str]:
    """Our processes still alive: any process (root namespace) whose command line names ``marker``
    (a per-test tmp path), and anything but the sshd listeners in the hosts' namespaces."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and _alive(int(d.name)):
                out.append(f"{d.name}: {cmd[:200]}")
    return out


@dataclass
class Cluster:
    tmp: Path
    key: Path  # authorized on both hosts
    wrong_key: Path  # authorized nowhere
    env: dict[str, str]
    sshd: dict[int, subprocess.Popen] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)

    def ns_extra_pids(self) -> dict[str, set[int]]:
        """Processes in the hosts' namespaces other than the sshd listeners (ssh sessions, ranks)."""
        listeners = {p.pid for p in self.sshd.values()}
        return {_ns(o): pids for o in HOSTS if (pids := _netns_pids(_ns(o)) - listeners)}

    def settle(self, timeout: float = 15.0) -> dict[str, set[int]]:
        deadline = time.monotonic() + timeout
        while (extra := self.ns_extra_pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return extra

    def accepted(self, octet: int) -> int:
        return self.logs[octet].read_text(errors="replace").count("Accepted publickey for root from " + LAUNCHER_IP)


def _netns_permitted() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN); run the suite as root, as CI does"
    if not shutil.which("ip"):
        subprocess.run(["bash", str(REPO / ".ci" / "netns")], capture_output=True, timeout=900)
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed and .ci/netns could not install it"
    probe = f"hvdkit-probe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return f"`ip netns add` is not permitted here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    why = _netns_permitted()
    if why:
        pytest.skip(why)
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh-keygen") or not shutil.which("unshare"):
        res = subprocess.run(["bash", str(REPO / ".ci" / "netns")], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f".ci/netns failed:\n{res.stderr[-3000:]}"
    tmp = tmp_path_factory.mktemp("multihost")
    created_etc = not NETNS_ETC.exists()
    created_run_sshd = not PRIVSEP.exists()
    _teardown_network(created_etc=False)  # what a killed earlier run may have left
    cluster = Cluster(tmp=tmp, key=tmp / "id_ok", wrong_key=tmp / "id_wrong", env={})
    try:
        _build(cluster)
        yield cluster
    finally:
        _kill(p.pid for p in cluster.sshd.values())
        for p in cluster.sshd.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        problems = _teardown_network(created_etc)
        if created_run_sshd:
            shutil.rmtree(PRIVSEP, ignore_errors=True)
        left = _leftovers(str(tmp))
        assert not problems and not left, f"not cleaned up: {problems} {left}"


def _build(c: Cluster) -> None:
    tmp = c.tmp
    for key in (c.key, c.wrong_key, tmp / "ssh_host_ed25519_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)], check=True,
                       capture_output=True, timeout=60)
    (tmp / "authorized_keys").write_text(Path(f"{c.key}.pub").read_text())
    (tmp / "authorized_keys").chmod(0o600)
    (tmp / "sshd_config").write_text(
        f"HostKey {tmp / 'ssh_host_ed25519_key'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        "Port 22\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\n"  # the keys live under /tmp (world-writable), which StrictModes rejects
        "PidFile none\nLogLevel INFO\n"
    )
    # Client side: known-hosts checks off for these throw-away host keys, and nothing written to
    # ~/.ssh. horovodrun runs `ssh` from PATH, so a wrapper adds `-F` (horovodrun passes -p/-i only).
    (tmp / "ssh_config").write_text(
        "Host *\n  User root\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        "  GlobalKnownHostsFile /dev/null\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n"
    )
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {tmp / "ssh_config"} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    PRIVSEP.mkdir(mode=0o755, exist_ok=True)

    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{LAUNCHER_IP}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for octet, with_sshd in HOSTS.items():
        ns, addr = _ns(octet), f"{SUBNET}.{octet}"
        _ip("netns", "add", ns)
        _ip("link", "add", f"{BRIDGE}-v{octet}", "type", "veth", "peer", "name", BRIDGE, "netns", ns)
        _ip("link", "set", f"{BRIDGE}-v{octet}", "master", BRIDGE, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", BRIDGE)
        _ip("-n", ns, "link", "set", BRIDGE, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / ns / "hosts").write_text(f"127.0.0.1 localhost\n{addr} {ns}\n")
        if not with_sshd:
            continue
        log = tmp / f"sshd-{octet}.log"
        c.logs[octet] = log
        c.sshd[octet] = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
             f"hostname {ns} && exec /usr/sbin/sshd -D -f {tmp / 'sshd_config'} -o ListenAddress={addr} -E {log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for octet, proc in c.sshd.items():
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"sshd on {SUBNET}.{octet} exited: {c.logs[octet].read_text()[-2000:]}"
            try:
                socket.create_connection((f"{SUBNET}.{octet}", 22), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"sshd on {SUBNET}.{octet} not listening"
                time.sleep(0.1)
    c.env = worker_env(PATH=os.pathsep.join([str(bindir), worker_env()["PATH"]]),
                       MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")


def _run(c: Cluster, name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    work = c.tmp / name
    work.mkdir()
    return hvdkit(["run", str(REPO / "recipes" / "digits.yaml"), *args, "--framework", "torch", "epochs=2",
                   "log.progress=false", f"checkpoint.dir={work / 'ckpt'}"], cwd=work, env=c.env, timeout=timeout)


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
    assert not cluster.settle(), "ssh sessions or ranks left running on the hosts"
    assert not _leftovers(str(cluster.tmp / "job"))


@pytest.mark.parametrize("case", ["unreachable-host", "refused-key"])
def test_bad_host_is_one_clear_line_and_nothing_starts(cluster, case):
    before = {o: cluster.accepted(o) for o in cluster.sshd}
    if case == "unreachable-host":  # 10.77.0.4 is up, but no sshd listens there
        args, bad, needle = ["-H", f"{SUBNET}.2:1,{SUBNET}.4:1", "-i", str(cluster.key)], [f"{SUBNET}.4"], "Connection refused"
    else:
        args, bad, needle = ["-H", f"{SUBNET}.2:1,{SUBNET}.3:1", "-i", str(cluster.wrong_key)], [f"{SUBNET}.2", f"{SUBNET}.3"], "Permission denied"
    t0 = time.monotonic()
    res = _run(cluster, case, "-np", "2", *args, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert all(h in errors[0] for h in bad) and needle in errors[0] and "fix:" in errors[0], errors[0]
    assert ("-p PORT" if case == "unreachable-host" else "-i KEY") in errors[0]
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60
    assert not list((cluster.tmp / case).glob("ckpt/*")), "training started"
    if case == "unreachable-host":  # the reachable host saw the check only, no task or rank
        assert cluster.accepted(2) == before[2] + 1
    assert not cluster.settle() and not _leftovers(str(cluster.tmp / case)), "something was left running"


def test_fewer_slots_than_ranks_names_the_hosts_and_starts_nothing(cluster):
    before = {o: cluster.accepted(o) for o in cluster.sshd}
    res = _run(cluster, "slots", "-np", "3", "-H", f"{SUBNET}.2:1,{SUBNET}.3:1", "-i", str(cluster.key), timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("hvdkit: error:") and "-np 3" in err and f"{SUBNET}.2:1,{SUBNET}.3:1" in err and "fix:" in err, err
    assert {o: cluster.accepted(o) for o in cluster.sshd} == before, "a host was contacted"
    assert not cluster.settle() and not _leftovers(str(cluster.tmp / "slots"))
