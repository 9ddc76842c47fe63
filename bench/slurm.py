"""Slurm: the same digits job on the same two nodes, its ranks started by ``srun --mpi=pmix`` (what
``hvdkit run`` does inside an allocation: Horovod's MPI controller, no ssh) against ``hvdkit run
--launcher horovodrun`` (horovodrun over ssh, Gloo), side by side in alternated rounds inside one
``salloc -N 2 -n 2`` per job.

Needs root and the two-node cluster of ``.ci/slurm`` (network namespaces hvdkit-sl1/2, which share
this machine's filesystem but not /tmp). For the horovodrun variant this bench starts an sshd in
each node's namespace, with the node's hostname and a host key of its own pinned in a known_hosts
of the bench, and stops them at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench import _common as C

BENCH = "slurm"
VARIANTS = ("srun --mpi=pmix", "horovodrun over ssh")
NODES = {"hvdkit-sl1": "10.78.0.11", "hvdkit-sl2": "10.78.0.12"}
# Each node has its own /tmp: the rank-0 summary and the bench's files live where both see them.
SHARED_TMP = Path("/var/tmp")


def _slurm_conf() -> str:
    res = subprocess.run(["bash", str(C.REPO / ".ci" / "slurm")], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise C.JobFailed(f".ci/slurm failed:\n{res.stderr[-2000:]}")
    return res.stdout.strip().splitlines()[-1].split("=", 1)[1]


def _start_sshds(tmp: Path) -> tuple[list[subprocess.Popen], Path]:
    """An sshd per node (its namespace, its hostname); returns them and a PATH dir whose `ssh`
    uses the bench's key and known_hosts with StrictHostKeyChecking yes."""
    subprocess.run(["bash", str(C.REPO / ".ci" / "netns")], check=True, timeout=900, capture_output=True)
    Path("/run/sshd").mkdir(exist_ok=True)
    key = tmp / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
    (tmp / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    known = []
    procs = []
    for node, addr in NODES.items():
        hostkey = tmp / f"host-{node}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True, timeout=60)
        known.append(f"{node},{addr} {' '.join(Path(f'{hostkey}.pub').read_text().split()[:2])}")
        conf = tmp / f"sshd-{node}.conf"
        conf.write_text(f"HostKey {hostkey}\nListenAddress {addr}\nPermitRootLogin prohibit-password\n"
                        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPasswordAuthentication no\n"
                        "StrictModes no\nUsePAM no\nPidFile none\n")
        procs.append(subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{node}", "unshare", "-u", "sh", "-c",
             f"hostname {node} && exec /usr/sbin/sshd -D -e -f {conf}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / f"sshd-{node}.log", "wb"), start_new_session=True))
    (tmp / "known_hosts").write_text("\n".join(known) + "\n")
    (tmp / "ssh_config").write_text(f"Host {' '.join(NODES)}\n  User root\n  IdentityFile {key}\n"
                                    f"  UserKnownHostsFile {tmp / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                                    "  BatchMode yes\n")
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {tmp / "ssh_config"} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    deadline = time.monotonic() + 20
    for addr in NODES.values():
        while True:
            try:
                socket.create_connection((addr, 22), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise C.JobFailed(f"sshd on {addr} not listening")
                time.sleep(0.2)
    return procs, bindir


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    if os.geteuid() != 0:
        C.note("slurm: needs root (.ci/slurm); skipped")
        return []
    reps = reps or (1 if quick else 3)
    steps = 200 if quick else 600
    slurm_conf = _slurm_conf()
    tempfile.tempdir = str(SHARED_TMP)  # run_job's summary file: rank 0 may write it on either node
    with tempfile.TemporaryDirectory(prefix="hvdkit-bench-slurm-", dir=SHARED_TMP) as td:
        tmp = Path(td)
        tmp.chmod(0o755)
        sshds, bindir = _start_sshds(tmp)
        try:
            env = C.job_env(SLURM_CONF=slurm_conf)
            env["PATH"] = f"{bindir}:{env['PATH']}"
            recipe = C.RECIPES / "digits.yaml"
            overrides = [f"steps={steps}", "eval.enabled=false"]
            sps: dict[str, list[float]] = {v: [] for v in VARIANTS}
            ratios = []
            for rnd in range(reps):
                got = {}
                for variant in C.rotated(VARIANTS, rnd):
                    launcher = "srun" if variant.startswith("srun") else "horovodrun"
                    cmd = ["salloc", "-N", "2", "-n", "2", "--quiet",
                           *C.hvdkit_cmd(recipe, 2, overrides, flags=("--launcher", launcher, "--framework", "torch"))]
                    res = C.run_job(cmd, env=env, cwd=tmp, what=variant, timeout=900)
                    got[variant] = res.samples_per_sec
                    sps[variant].append(res.samples_per_sec)
                    C.emit({"bench": BENCH, "kind": "measurement", "variant": variant, "round": rnd, "np": 2,
                            "nodes": 2, "steps": steps, "samples_per_sec": round(res.samples_per_sec, 1),
                            "wall_s": round(res.wall_s, 2)})
                ratios.append(got[VARIANTS[0]] / got[VARIANTS[1]])
            out = [C.result(BENCH, f"samples/s, {v}", sps[v], unit="samples/s") for v in VARIANTS]
            out.append(C.result(BENCH, "srun / horovodrun over ssh, samples/s", ratios, goal="report"))
            return out
        finally:
            for p in sshds:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                p.wait(timeout=15)
