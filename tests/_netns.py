"""Real ssh hosts on one machine for tests: each a network namespace with its own address, hostname
and sshd, joined by a bridge to the launcher (the root namespace). Shared by tests/test_multihost.py
and tests/test_secrets.py (each builds the hosts for its module and removes them after).

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

The client checks host keys as a real cluster's should: the hosts' keys are written to a
known_hosts file of the test and ssh runs with `StrictHostKeyChecking yes` (hvdkit removes
Horovod's `StrictHostKeyChecking=no`). horovodrun runs `ssh` from PATH, so a wrapper adds
`-F <config>` (horovodrun passes -p/-i only) and logs every ssh command line it is given to
``Cluster.ssh_log``; ``HVDKIT_TEST_SSH_CONFIG`` picks another config (the bad-host-key cases).

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, sqlite_store, worker_env

BRIDGE = "hvdkmh0"  # also the interface's name inside each namespace
SUBNET = "10.77.0"
LAUNCHER_IP = f"{SUBNET}.1"
HOSTS = {2: True, 3: True, 4: False}  # last octet -> runs sshd
NETNS_ETC = Path("/etc/netns")
PRIVSEP = Path("/run/sshd")  # sshd's privilege-separation directory (Debian's package makes it at boot)


def ns_name(octet: int) -> str:
    return f"hvdkit-mh{octet}"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def netns_pids(ns: str) -> set[int]:
    res = ip("netns", "pids", ns, check=False)
    return {int(p) for p in res.stdout.split()} if res.returncode == 0 else set()


def kill(pids, wait_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, by process id."""
    pids = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)


def alive(pid: int) -> bool:
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
        ns = ns_name(octet)
        kill(netns_pids(ns))
        if ip("netns", "del", ns, check=False).returncode != 0 and ns in ip("netns", "list").stdout.split():
            problems.append(f"netns {ns}")
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        ip("link", "del", f"{BRIDGE}-v{octet}", check=False)  # gone with its peer's namespace already
    ip("link", "del", BRIDGE, check=False)
    if ip("link", "show", BRIDGE, check=False).returncode == 0:
        problems.append(f"link {BRIDGE}")
    if created_etc:
        try:
            NETNS_ETC.rmdir()
        except OSError:
            pass
    return problems


def leftovers(marker: str) -> list[str]:
    """Our processes still alive: any process (root namespace) whose command line names ``marker``
    (a per-test tmp path)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and alive(int(d.name)):
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
    host_keys: dict[int, str] = field(default_factory=dict)  # octet -> "ssh-ed25519 AAAA..."

    @property
    def ssh_log(self) -> Path:
        """Every command line the ssh wrapper was given (one per line)."""
        return self.tmp / "ssh-argv.log"

    def ssh_config(self, name: str, known_hosts: str) -> str:
        """Write another client config (same key, user, options) whose known_hosts holds
        ``known_hosts``; returns its path, for HVDKIT_TEST_SSH_CONFIG."""
        (self.tmp / f"known_hosts-{name}").write_text(known_hosts)
        path = self.tmp / f"ssh_config-{name}"
        path.write_text(_client_config(self.tmp / f"known_hosts-{name}"))
        return str(path)

    def ns_extra_pids(self) -> dict[str, set[int]]:
        """Processes in the hosts' namespaces other than the sshd listeners (ssh sessions, ranks)."""
        listeners = {p.pid for p in self.sshd.values()}
        return {ns_name(o): pids for o in HOSTS if (pids := netns_pids(ns_name(o)) - listeners)}

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


@contextmanager
def netns_cluster(tmp: Path) -> Iterator[Cluster]:
    """The hosts, built in ``tmp`` (keys, configs, logs) and removed afterwards; fails the test if
    anything of ours is left running."""
    why = _netns_permitted()
    if why:
        pytest.skip(why)
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh-keygen") or not shutil.which("unshare"):
        res = subprocess.run(["bash", str(REPO / ".ci" / "netns")], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f".ci/netns failed:\n{res.stderr[-3000:]}"
    created_etc = not NETNS_ETC.exists()
    created_run_sshd = not PRIVSEP.exists()
    _teardown_network(created_etc=False)  # what a killed earlier run may have left
    cluster = Cluster(tmp=tmp, key=tmp / "id_ok", wrong_key=tmp / "id_wrong", env={})
    try:
        _build(cluster)
        yield cluster
    finally:
        kill(p.pid for p in cluster.sshd.values())
        for p in cluster.sshd.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        problems = _teardown_network(created_etc)
        if created_run_sshd:
            shutil.rmtree(PRIVSEP, ignore_errors=True)
        left = leftovers(str(tmp))
        assert not problems and not left, f"not cleaned up: {problems} {left}"


def _client_config(known_hosts: Path) -> str:
    # Host keys checked against the test's own known_hosts (nothing read from or written to
    # ~/.ssh); BatchMode: fail rather than prompt.
    return (f"Host *\n  User root\n  StrictHostKeyChecking yes\n  UserKnownHostsFile {known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True,
                   capture_output=True, timeout=60)


def _build(c: Cluster) -> None:
    tmp = c.tmp
    for key in (c.key, c.wrong_key):
        _keygen(key)
    (tmp / "authorized_keys").write_text(Path(f"{c.key}.pub").read_text())
    (tmp / "authorized_keys").chmod(0o600)
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$*\" >> {c.ssh_log}\n"
        f'exec {shutil.which("ssh")} -F "${{HVDKIT_TEST_SSH_CONFIG:-{tmp / "ssh_config"}}}" "$@"\n')
    (bindir / "ssh").chmod(0o755)
    PRIVSEP.mkdir(mode=0o755, exist_ok=True)

    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{LAUNCHER_IP}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for octet, with_sshd in HOSTS.items():
        ns, addr = ns_name(octet), f"{SUBNET}.{octet}"
        ip("netns", "add", ns)
        ip("link", "add", f"{BRIDGE}-v{octet}", "type", "veth", "peer", "name", BRIDGE, "netns", ns)
        ip("link", "set", f"{BRIDGE}-v{octet}", "master", BRIDGE, "up")
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", BRIDGE)
        ip("-n", ns, "link", "set", BRIDGE, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / ns / "hosts").write_text(f"127.0.0.1 localhost\n{addr} {ns}\n")
        if not with_sshd:
            continue
        # Each host its own host key, as real hosts have (a shared one could not show a changed key).
        host_key = tmp / f"ssh_host_ed25519_key-{octet}"
        _keygen(host_key)
        c.host_keys[octet] = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        config = tmp / f"sshd_config-{octet}"
        config.write_text(
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}\n"
            "Port 22\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\n"  # the keys live under /tmp (world-writable), which StrictModes rejects
            "PidFile none\nLogLevel INFO\n"
        )
        log = tmp / f"sshd-{octet}.log"
        c.logs[octet] = log
        c.sshd[octet] = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
             f"hostname {ns} && exec /usr/sbin/sshd -D -f {config} -o ListenAddress={addr} -E {log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The launcher's known_hosts: what an admin writes after checking each host's fingerprint.
    (tmp / "known_hosts").write_text("".join(f"{SUBNET}.{o} {k}\n" for o, k in c.host_keys.items()))
    (tmp / "ssh_config").write_text(_client_config(tmp / "known_hosts"))
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
                       MLFLOW_TRACKING_URI=sqlite_store(tmp))
