"""Turn a validated recipe + options into a ``horovodrun`` command line, and run it.

Everything that can be checked before a worker starts is checked here (recipe, framework built
into Horovod, slots), so bad input costs one line and exit code 2, never a half-started job.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hvdkit.build import env as build_env
from hvdkit.errors import LaunchError
from hvdkit.tracking import _credentials

if TYPE_CHECKING:  # only an annotation here; hvdkit._horovodrun imports this module and stays light
    from hvdkit.recipe import LoadedRecipe

# horovodrun's own host grammar ([\w.-]+, see horovod.runner.common.util.hosts); hvdkit also takes
# a bare host (one slot) and hands horovodrun the normalized list (hosts_arg).
_HOST = re.compile(r"^([\w.\-]+)(?::(\d+))?$")


@dataclass
class LaunchOptions:
    np: int = 1
    hosts: str | None = None
    hostfile: str | None = None
    controller: str = "gloo"  # gloo | mpi
    timeline: str | None = None
    autotune: bool = False
    autotune_log: str | None = None
    fusion_threshold_mb: float | None = None
    cycle_time_ms: float | None = None
    ssh_port: int | None = None
    ssh_identity_file: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Elastic training (Horovod elastic, Gloo): see the "elastic" section below.
    elastic: bool = False
    min_np: int | None = None
    max_np: int | None = None
    host_discovery_script: str | None = None
    slots_per_host: int | None = None
    elastic_timeout: int | None = None
    reset_limit: int | None = None
    blacklist_cooldown: tuple[int, int] | None = None
    network_interface: str | None = None
    # Secrets (see worker_env): whether the job writes to MLflow, and whether it spans hosts (None:
    # not decided yet; check_ssh decides it from the hosts it checked).
    track: bool = True
    multi_host: bool | None = None


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """``"a:2,b:1"`` -> ``[("a", 2), ("b", 1)]``; a host without ``:N`` has one slot."""
    hosts = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _HOST.match(part)
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise LaunchError(f"bad host entry {part!r} in -H {spec!r}", fix="write hosts as host:slots, e.g. -H node1:2,node2:2")
        hosts.append((m.group(1), int(m.group(2) or 1)))
    if not hosts:
        raise LaunchError(f"-H {spec!r} names no host", fix="write hosts as host:slots, e.g. -H node1:2,node2:2")
    return hosts


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"hostfile {path} not found", fix="pass an existing file with lines like `node1 slots=2`")
    hosts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^([\w.\-]+)(?:\s+slots\s*=\s*(\d+))?\s*$", line)
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise LaunchError(f"hostfile {path} line {n}: cannot parse {line!r}", fix="write one `host slots=N` per line, N >= 1")
        hosts.append((m.group(1), int(m.group(2) or 1)))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no host", fix="write one `host slots=N` per line")
    return hosts


def hosts_arg(opts: LaunchOptions) -> str:
    """``-H`` for horovodrun, from -H or --hostfile as hvdkit parsed them: horovodrun's own parsers
    take neither a bare host (-H node1), nor comments, blank lines or a line without slots= in a
    hostfile (ValueError / IndexError tracebacks)."""
    hosts = parse_hosts(opts.hosts) if opts.hosts else parse_hostfile(opts.hostfile) if opts.hostfile else [("localhost", opts.np)]
    return ",".join(f"{h}:{s}" for h, s in hosts)


def whole_mb(value: float) -> int:
    """``--fusion-threshold-mb`` as horovodrun takes it: a whole number of MB >= 0 (0: no fusion)."""
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise LaunchError(f"--fusion-threshold-mb {value:g} is not a whole number of MB >= 0",
                          fix="pass an integer, e.g. --fusion-threshold-mb 64 (0 turns tensor fusion off)")
    return int(value)


def positive_ms(value: float) -> float:
    """``--cycle-time-ms``: > 0 (0 would make every rank's Horovod thread spin on a core)."""
    if not math.isfinite(value) or value <= 0:
        raise LaunchError(f"--cycle-time-ms {value:g} must be a positive number of milliseconds",
                          fix="pass e.g. --cycle-time-ms 1 (Horovod's default) or 5")
    return float(value)


def _check_output_file(flag: str, path: str) -> None:
    p = Path(path).resolve()
    if p.is_dir():
        raise LaunchError(f"{flag} {path} is a directory", fix=f"pass a file name, e.g. {flag} {p / 'horovod.json'}")
    if not p.parent.is_dir():
        raise LaunchError(f"{flag} {path}: directory {p.parent} does not exist",
                          fix=f"create it first (mkdir -p {p.parent}) or write the file elsewhere")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise LaunchError(f"{flag} {path}: directory {p.parent} is not writable", fix="write the file to a directory you can write to")


def check_options(opts: LaunchOptions) -> None:
    """The launch flags horovodrun would reject only once started (or never: a timeline into a
    missing directory is just not written), checked before anything starts; normalizes them."""
    if opts.fusion_threshold_mb is not None:
        opts.fusion_threshold_mb = whole_mb(opts.fusion_threshold_mb)
    if opts.cycle_time_ms is not None:
        opts.cycle_time_ms = positive_ms(opts.cycle_time_ms)
    if opts.ssh_port is not None and not 1 <= opts.ssh_port <= 65535:
        raise LaunchError(f"-p {opts.ssh_port} is not a TCP port", fix="pass the hosts' sshd port, 1-65535 (ssh's default: 22)")
    if opts.ssh_identity_file and not Path(opts.ssh_identity_file).is_file():
        raise LaunchError(f"ssh key {opts.ssh_identity_file} (-i) not found", fix="pass the private key file of a key the hosts authorize")
    if opts.autotune_log and not opts.autotune:
        raise LaunchError(f"--autotune-log {opts.autotune_log} without --autotune", fix="add --autotune, or drop --autotune-log")
    for flag, path in (("--timeline", opts.timeline), ("--autotune-log", opts.autotune_log)):
        if path:
            _check_output_file(flag, path)


def resolve_hosts(opts: LaunchOptions) -> list[tuple[str, int]]:
    check_options(opts)
    if opts.elastic:
        return check_elastic(opts)  # the hosts discovery lists now; slots are Horovod's to wait for
    if opts.hosts and opts.hostfile:
        raise LaunchError("both -H and --hostfile given", fix="pass one of them")
    hosts = parse_hosts(opts.hosts) if opts.hosts else parse_hostfile(opts.hostfile) if opts.hostfile else [("localhost", opts.np)]
    slots = sum(s for _, s in hosts)
    if opts.np < 1:
        raise LaunchError(f"-np {opts.np} must be at least 1", fix="pass -np 1 or more")
    if opts.np > slots:
        listing = ",".join(f"{h}:{s}" for h, s in hosts)
        raise LaunchError(f"-np {opts.np} is larger than the {slots} slot(s) of the hosts ({listing})",
                          fix=f"lower -np to {slots} or add slots (-H host:slots)")
    return hosts


def check_framework_built(framework: str) -> None:
    """Is ``horovod.<framework>`` available? Fast path: hvdkit's build marker; else import it in a subprocess."""
    if not build_env.framework_version(framework):
        raise LaunchError(f"framework {framework!r} is not installed", fix=build_env.INSTALL_HINT[framework])
    if not build_env.dist_version("horovod"):
        raise LaunchError("Horovod is not installed", fix="hvdkit build-horovod")
    build = build_env.installed_build()
    if build and build.get("frameworks", {}).get(framework) == build_env.framework_version(framework):
        return
    probe = build_env.probe_horovod([framework])[framework]
    if not probe.get("ok"):
        raise LaunchError(f"Horovod is not built with {framework} ({probe.get('error')})",
                          fix=f"hvdkit build-horovod --frameworks {framework}  (`hvdkit doctor` explains)")


def worker_env(opts: LaunchOptions) -> dict[str, str]:
    """horovodrun's environment, which it forwards to every rank. A job that spans hosts leaves its
    secrets on the launcher (named in one line on stderr): see :func:`forwarded_env`."""
    env, removed = forwarded_env(opts)
    if removed:
        print("hvdkit: kept on the launcher, not forwarded to the hosts: " + ", ".join(removed), file=sys.stderr,
              flush=True)
    return env


def forwarded_env(opts: LaunchOptions, hosts: list[tuple[str, int]] | None = None) -> tuple[dict[str, str], list[str]]:
    """(the environment horovodrun gets, the names of the secrets taken out of it).

    horovodrun copies its whole environment to each rank: for a remote rank onto the ssh command
    line (Gloo: ``ssh HOST 'env NAME=VALUE ... python ...'``, readable in ``ps`` on the launcher and
    the host), or, with --mpi, to Open MPI's daemons over their unencrypted TCP channel (every
    name is an ``-x NAME`` of mpirun). Local ranks inherit it from the launcher (hvdkit._horovodrun
    keeps secrets out of their ``env`` command line too). So when any rank may run on another host,
    passwords, tokens, cloud keys and URIs with a password stay here, and rank 0 reads MLflow's
    credentials from a file on its host (hvdkit.tracking._credentials). An MLFLOW_TRACKING_URI with a
    password cannot stay behind (rank 0 needs the store): refused, one line.
    """
    env = dict(os.environ, **opts.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Open MPI refuses to run as root without both (containers usually run as root).
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if opts.multi_host is None:
        opts.multi_host = spans_hosts(opts, hosts)
    if not opts.multi_host:
        return env, []
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if opts.track and _credentials.uri_password(uri):
        raise LaunchError(f"MLFLOW_TRACKING_URI {_credentials.mask_uri(uri)} holds a password, which horovodrun "
                          "would copy onto every remote rank's command line",
                          fix="take it out of the URI; for an MLflow server put user and password in a credentials "
                              f"file on rank 0's host ({_credentials.DEFAULT_FILE} or ${_credentials.ENV_FILE}, mode 600), "
                              "for a database use its client's password file (PostgreSQL: ~/.pgpass)")
    if opts.controller == "mpi" and not env.get("OMPI_MCA_plm_rsh_agent"):
        # mpirun's own ssh: fail on a host key it cannot check instead of prompting (see SSH_COMMAND_PREFIX).
        env["OMPI_MCA_plm_rsh_agent"] = "ssh -o BatchMode=yes"
    return _credentials.strip_secrets(env)


def spans_hosts(opts: LaunchOptions, hosts: list[tuple[str, int]] | None = None) -> bool:
    """May a rank of this job run on another host than the launcher? Yes when a host is not one of
    this machine's addresses (horovodrun's own test), and for an elastic job whose hosts can change
    (a host that joins later gets the same environment)."""
    if opts.elastic and _discovery_command(opts) is not None:
        return True
    if hosts is None:
        hosts = parse_hosts(opts.hosts) if opts.hosts else parse_hostfile(opts.hostfile) if opts.hostfile else []
    names = list(dict.fromkeys(h for h, _ in hosts))
    if all(h in ("localhost", "127.0.0.1") for h in names):
        return False
    from horovod.runner.util import network

    return bool(network.filter_local_addresses(names))


def horovodrun_command(loaded: LoadedRecipe, opts: LaunchOptions, train_args: list[str], overrides: list[str]) -> list[str]:
    if not build_env.dist_version("horovod"):
        raise LaunchError("Horovod is not installed in this environment", fix="hvdkit build-horovod")
    # horovodrun's own command line, minus its seconds-long framework probe (see hvdkit._horovodrun)
    cmd = [sys.executable, "-m", "hvdkit._horovodrun", "-np", str(opts.np)]
    if opts.elastic:
        cmd += elastic_args(opts)
    elif opts.hosts:
        cmd += ["-H", hosts_arg(opts)]
    elif opts.hostfile:
        cmd += ["-H", hosts_arg(opts)]
    if opts.network_interface and not opts.elastic:
        cmd += ["--network-interfaces", opts.network_interface]
    cmd.append(f"--{opts.controller}")
    if opts.timeline:
        cmd += ["--timeline-filename", str(Path(opts.timeline).resolve())]
    if opts.autotune:
        cmd.append("--autotune")
        if opts.autotune_log:
            cmd += ["--autotune-log-file", str(Path(opts.autotune_log).resolve())]
    if opts.fusion_threshold_mb is not None:
        cmd += ["--fusion-threshold-mb", str(whole_mb(opts.fusion_threshold_mb))]  # horovodrun: int only
    if opts.cycle_time_ms is not None:
        cmd += ["--cycle-time-ms", str(positive_ms(opts.cycle_time_ms))]
    if opts.ssh_port:
        cmd += ["-p", str(opts.ssh_port)]
    if opts.ssh_identity_file:
        cmd += ["-i", opts.ssh_identity_file]
    return cmd + train_command(loaded, train_args, overrides)


def train_command(loaded: LoadedRecipe, train_args: list[str], overrides: list[str]) -> list[str]:
    """Each rank's command, whichever launcher starts it (horovodrun here, srun in hvdkit.launch.slurm)."""
    spec = loaded.recipe.python or str(loaded.source)
    return [sys.executable, "-m", "hvdkit.train", spec, "--framework", loaded.recipe.framework, *train_args, *overrides]


# How long local workers get to end their runs after a Ctrl-C before horovodrun is told too.
STOP_GRACE_S = 20.0


def _local_workers(pid: int) -> list:
    """The ``hvdkit.train`` processes under launcher ``pid`` (local ranks; remote ones sit behind ssh)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if "hvdkit.train" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _rank_of(proc) -> int | None:
    try:
        env = proc.environ()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return None


def _terminate(procs) -> None:
    for p in procs:
        try:
            p.terminate()
        except Exception:  # noqa: BLE001 - gone already
            pass


def _alive(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends: gone
        return False


class _GracefulStop:
    """What the launcher does after a Ctrl-C/SIGTERM, one poll at a time (see run_forwarding)."""

    def __init__(self, pid: int, signum: int, grace_s: float, cmd0: str = "") -> None:
        self.pid, self.signum, self.cmd0 = pid, signum, cmd0
        self.deadline = time.monotonic() + grace_s
        self.forwarded = False
        workers = _local_workers(pid)
        # Rank 0 first: it writes the runs. Peers stopped at the same time would exit first and
        # horovodrun would then SIGSTOP/SIGKILL rank 0 in the middle of its flush.
        self.first = [w for w in workers if _rank_of(w) == 0] or workers
        self.rest_stopped = self.first is workers
        _terminate(self.first)

    def poll(self) -> None:
        if self.forwarded:
            return
        if not self.rest_stopped and not any(_alive(w) for w in self.first):
            self.rest_stopped = True
            _terminate(_local_workers(self.pid))
        if time.monotonic() >= self.deadline or (self.rest_stopped and not _local_workers(self.pid)):
            self.forward()

    def forward(self) -> None:
        self.forwarded = True
        _killpg(self.pid, _forwarded_signal(self.cmd0, self.signum))


def run_forwarding(cmd: Sequence[str], env: dict[str, str], *, grace_s: float = STOP_GRACE_S) -> tuple[int, int | None]:
    """Run ``cmd`` (horovodrun) in its own process group and stop it cleanly on SIGINT/SIGTERM;
    report which signal, if any, we received: that tells an interrupted job (KILLED) from a
    failed one (FAILED), whatever exit code horovodrun returns.

    Why not just forward the signal: on a signal horovodrun (0.28.1, Gloo) SIGSTOPs each worker
    and SIGKILLs it 5 s later, so no rank ends its run or flushes its last metrics; and its
    middleman can reap the killed worker before its own ``wait()``, which then reports exit 0
    (a Ctrl-C'd job "succeeded"). So the first signal SIGTERMs the local workers, rank 0 first
    (each ends its runs KILLED, rank 0 flushes), and horovodrun gets the signal once they are
    gone or after ``grace_s``; a second signal forwards at once.

    The output goes through the console relay (``_console.Relay``): rank 0's lines, the other ranks'
    warnings and errors, rank 0's progress as one bar, and every raw line to a log file whose path
    is printed at the end. The relay reads on its own thread, so signals are handled here as before.
    """
    from hvdkit.launch import _console
    from hvdkit.tracking import keys

    # The ranks' output reaches the terminal through the console relay (launch/_console.py), and
    # rank 0 draws no tqdm bar of its own but tells the relay its progress.
    env = {**env, _console.PROGRESS_ENV: "1"}
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = _console.RawLog(_console.new_log_path(env.get(keys.ENV_JOB_ID)))
    relay = _console.Relay(proc.stdout.fileno(), proc.stderr.fileno(), log).start()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stop: _GracefulStop | None = None
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # a handler installed by someone else raced ours; keep waiting
                continue
            if received:
                if stop is None:
                    stop = _GracefulStop(proc.pid, received[0], grace_s, cmd0=str(cmd[0]))
                if len(received) > 1 and not stop.forwarded:
                    stop.forward()
                stop.poll()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        relay.finish()  # within DRAIN_S: the relay ends with the job
        proc.stdout.close()
        proc.stderr.close()
        dropped = f" ({log.dropped:,} bytes over its limit not kept)" if log.dropped else ""
        print(f"hvdkit: every rank's full output: {log.path}{dropped}", file=sys.stderr, flush=True)
    return rc, (received[0] if received else None)


def _forwarded_signal(cmd0: str, signum: int) -> int:
    """The signal the launcher's child gets for ``signum``. srun answers a lone SIGINT by printing
    its tasks' status, not by stopping them (a second one within a second kills them outright,
    with no time to end the runs); SIGTERM it forwards to every task, on every node. The ranks
    under srun are slurmstepd's children, not srun's, so _GracefulStop finds no local worker
    and forwards at once."""
    if os.path.basename(cmd0) == "srun":
        return signal.SIGTERM
    return signum


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


SSH_CHECK_TIMEOUT_S = 10
# horovodrun's ssh prefix is "ssh -o PasswordAuthentication=no -o StrictHostKeyChecking=no": any
# host key accepted, so whoever answers on a host's address gets the job (and its environment).
# hvdkit drops the StrictHostKeyChecking option, so the user's known_hosts and ssh config decide,
# and adds BatchMode (no prompt for a key nobody can answer; fail instead). Installed into
# Horovod's runner by use_host_key_checking() in the launcher (check_ssh) and in hvdkit._horovodrun,
# so every ssh horovodrun issues (checks, task servers, ranks, elastic workers) takes it.
SSH_COMMAND_PREFIX = "ssh -o PasswordAuthentication=no -o BatchMode=yes"


def use_host_key_checking() -> None:
    from horovod.runner.util import remote

    remote.SSH_COMMAND_PREFIX = SSH_COMMAND_PREFIX  # get_ssh_command reads the module global per call


def _keyscan(host: str, opts: LaunchOptions) -> str:
    return f"ssh-keyscan -p {opts.ssh_port or 22} {host}"


_SSH_FIXES = (  # (what ssh said, how to fix it); {h} is the host, {scan} the ssh-keyscan command for it
    ("Permission denied", "authorize the key on {h} (the remote user's ~/.ssh/authorized_keys) or pass the right one with -i KEY"),
    ("Connection refused", "start sshd on {h}, or pass its port with -p PORT"),
    ("Could not resolve hostname", "fix the host name {h} in -H/--hostfile"),
    ("host key changed", "if {h} was reinstalled, remove its old key (ssh-keygen -R {h}) and add the new one to "
                         "~/.ssh/known_hosts after checking its fingerprint (`{scan}`); otherwise someone else answers "
                         "on its address"),
    ("Host key verification failed", "add {h}'s host key to ~/.ssh/known_hosts after checking its fingerprint "
                                     "(`{scan}` prints it); hvdkit does not skip host-key checks"),
)

# Run on rank 0's host by check_ssh's probe: is the credentials file there, readable, private, with
# a password in it? Prints one "hvdkit-cred ..." line; $1 is the file.
_CRED_PROBE = ('f="$1"; if [ -r "$f" ]; then printf "hvdkit-cred %s %s\\n" "$(stat -L -c %a "$f")" '
               '"$(grep -ci "^[[:space:]]*' + _credentials.PASSWORD_KEY + '[[:space:]]*[=:]" "$f")"; '
               'elif [ -e "$f" ]; then echo "hvdkit-cred unreadable"; else echo "hvdkit-cred missing"; fi')


def _credentials_needed(opts: LaunchOptions, env: dict[str, str], removed: list[str]) -> bool:
    """Does rank 0 need a credentials file: a tracked job on an MLflow server whose launcher had a
    password (stripped from the ranks' environment) or reads one from a file itself?"""
    if not opts.track or not env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return False
    if {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} & set(removed):
        return True
    try:
        return _credentials.find_source().kind == "file"
    except Exception:  # noqa: BLE001 - the launcher's own file was checked (and refused) before this
        return False


def _credentials_error(host: str, path: str, said: str, ssh_user_note: str = "") -> LaunchError | None:
    """check_ssh's refusal for rank 0's credentials file as the probe on ``host`` saw it (``said``:
    the "hvdkit-cred ..." line), None when it is usable."""
    why = "horovodrun would put MLFLOW_TRACKING_PASSWORD on the ssh command line, so hvdkit does not forward it"
    example = (f"[mlflow] / {_credentials.USERNAME_KEY} = USER / {_credentials.PASSWORD_KEY} = PASSWORD, "
               f"or set {_credentials.ENV_FILE} to the file the cluster mounts")
    parts = said.split()
    if parts[1:2] == ["missing"]:
        return LaunchError(f"rank 0's host {host} has no MLflow credentials file {path} ({why})",
                           fix=f"create it on {host} with mode 600: {example}")
    if parts[1:2] == ["unreadable"]:
        return LaunchError(f"MLflow credentials file {path} on {host} is not readable{ssh_user_note}",
                           fix=f"make it readable by the job's user on {host} (chown USER {path}; chmod 600 {path})")
    try:
        mode, passwords = int(parts[1], 8), int(parts[2])
    except (IndexError, ValueError):
        return LaunchError(f"cannot check the MLflow credentials file {path} on {host} (the probe printed {said!r})",
                           fix=f"check that {host} has a POSIX sh, stat and grep")
    problem = _credentials.mode_problem(path, mode)
    if problem:
        return LaunchError(f"{problem.message} (on {host})", fix=f"chmod 600 {path} on {host}")
    if not passwords:
        return LaunchError(f"MLflow credentials file {path} on {host} holds no {_credentials.PASSWORD_KEY}",
                           fix=f"write it as {example}")
    return None


def check_ssh(hosts: list[tuple[str, int]], opts: LaunchOptions) -> None:
    """ssh once to every remote host, in parallel, before horovodrun starts anything.

    horovodrun checks too, but retries each host five times and reports a failure as a
    traceback; here an unreachable host, a refused key or an unknown host key costs one line
    naming the host, and exit 2. It is horovodrun's own ssh command (same options, -p, -i,
    ~/.ssh/config, host keys checked: see SSH_COMMAND_PREFIX), so what passes here passes there.
    When the job spans hosts and rank 0 needs MLflow credentials (its password was kept on the
    launcher), the probe of rank 0's host also checks the credentials file rank 0 will read.
    The ssh part is skipped under the Kubeflow MPI Operator's exec-based launcher.
    """
    import shlex
    from concurrent.futures import ThreadPoolExecutor

    from horovod.runner.common.util import env as hvd_env
    from horovod.runner.util import network, remote

    use_host_key_checking()
    names = list(dict.fromkeys(h for h, _ in hosts))
    remote_hosts = network.filter_local_addresses(names) if not all(h in ("localhost", "127.0.0.1") for h in names) else []
    opts.multi_host = bool(remote_hosts) or spans_hosts(opts, hosts)
    env, removed = forwarded_env(opts, hosts)  # refuses a tracking URI with a password first
    rank0 = hosts[0][0] if hosts else None
    cred_path = None
    if opts.multi_host and rank0 and _credentials_needed(opts, env, removed):
        cred_path = str(_credentials.credentials_path(env))
        if env.get(_credentials.ENV_FILE):
            cred_path = os.path.join(os.getcwd(), cred_path)  # horovodrun starts ranks in this directory
        if rank0 not in remote_hosts:  # rank 0 on this machine: look at the file here
            source = _credentials.find_source(env)  # an unsafe or missing named file raises, one line
            if source.kind != "file" or not source.has_password:
                said = "hvdkit-cred missing" if source.kind != "file" else "hvdkit-cred 600 0"
                raise _credentials_error(rank0, cred_path, said)
    if hvd_env.is_kubeflow_mpi() or not remote_hosts:
        return

    def probe(host: str) -> tuple[str, str | None, str]:
        command = "true"
        if cred_path and host == rank0:
            command = shlex.quote("sh -c " + shlex.quote(_CRED_PROBE) + " hvdkit " + shlex.quote(cred_path))
        cmd = remote.get_ssh_command(command, host, port=opts.ssh_port, identity_file=opts.ssh_identity_file,
                                     timeout_s=SSH_CHECK_TIMEOUT_S)
        try:
            # horovodrun's environment, not the launcher's: no secret in the ssh process either
            res = subprocess.run(cmd, shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=SSH_CHECK_TIMEOUT_S + 20, env=env)
        except subprocess.TimeoutExpired:
            return host, f"no answer within {SSH_CHECK_TIMEOUT_S + 20} s", ""
        if res.returncode == 0:
            return host, None, res.stdout
        if "IDENTIFICATION HAS CHANGED" in res.stderr:
            return host, "host key changed", ""
        said = [ln.strip() for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently added")]
        return host, said[-1] if said else f"ssh exited with {res.returncode}", ""

    with ThreadPoolExecutor(max_workers=min(32, len(remote_hosts))) as pool:
        results = list(pool.map(probe, remote_hosts))
    failed = [(h, why) for h, why, _ in results if why]
    if failed:
        host, why = failed[0]
        fix = next((f for needle, f in _SSH_FIXES if needle in why),
                   "check that {h} is up and reachable, and that `ssh {h} true` works without a password (-p PORT, -i KEY)")
        raise LaunchError("cannot ssh to " + ", ".join(f"{h} ({w})" for h, w in failed),
                          fix=fix.format(h=host, scan=_keyscan(host, opts)))
    for host, _, out in results:
        if cred_path and host == rank0:
            said = next((ln.strip() for ln in out.splitlines() if ln.startswith("hvdkit-cred")), "hvdkit-cred ?")
            error = _credentials_error(host, cred_path, said, " by the ssh user")
            if error:
                raise error


# -- elastic -----------------------------------------------------------------------------------
# Horovod elastic (Gloo only): workers come and go while the job runs. Hosts come from a
# discovery command horovodrun runs every second: the user's --host-discovery-script, or, for
# --hostfile, hvdkit's reader of that file (edit the file while the job runs: a removed host's
# workers are stopped, an added one's started), or the fixed -H list (fault tolerance only).
# A host whose worker failed is blacklisted; it comes back after a cool-down (hvdkit's default
# below; Horovod's own default is never), so a restarted host rejoins.

DEFAULT_BLACKLIST_COOLDOWN = (10, 300)  # seconds: first return after 20-30 s, backing off to 5 min
DISCOVERY_CHECK_TIMEOUT_S = 10
# Prints "host:slots" per host line of a `host slots=N` / `host:N` file; a missing file, no hosts.
_HOSTFILE_AWK = ('{ sub(/#.*/, ""); gsub(/[ \\t]*=[ \\t]*/, "="); if (NF == 0) next; h = $1; n = 1; '
                 'if (h ~ /:/) { print h; next } for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7); '
                 'print h ":" n }')


def hostfile_discovery_command(path: str) -> str:
    """The discovery command (a shell line) that lists the hosts of hostfile ``path`` each time it runs."""
    import shlex

    return f"cat {shlex.quote(str(Path(path).resolve()))} 2>/dev/null | awk {shlex.quote(_HOSTFILE_AWK)}"


def _discovery_command(opts: LaunchOptions) -> str | None:
    if opts.host_discovery_script:
        return str(Path(opts.host_discovery_script).resolve()) if Path(opts.host_discovery_script).exists() \
            else opts.host_discovery_script
    if opts.hostfile:
        return hostfile_discovery_command(opts.hostfile)
    return None


def discover(command: str, default_slots: int = 1) -> list[tuple[str, int]]:
    """Run a discovery command once, as horovodrun will: its ``host[:slots]`` lines."""
    try:
        res = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=DISCOVERY_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"host discovery {command!r} did not finish within {DISCOVERY_CHECK_TIMEOUT_S} s",
                          fix="make it print `host:slots` lines and exit at once (horovodrun runs it every second)") from None
    if res.returncode != 0:
        said = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise LaunchError(f"host discovery {command!r} failed: {said}",
                          fix="make it exit 0 and print one `host:slots` line per available host")
    hosts = []
    for line in filter(None, (ln.strip() for ln in res.stdout.splitlines())):
        host, _, slots = line.partition(":")
        if not host or (slots and not slots.isdigit()):
            raise LaunchError(f"host discovery printed {line!r}", fix="print one `host` or `host:slots` line per host")
        hosts.append((host, int(slots) if slots else default_slots))
    return hosts


def check_elastic(opts: LaunchOptions) -> list[tuple[str, int]]:
    """Check an elastic launch before anything starts; returns the hosts discovered now."""
    if opts.controller != "gloo":
        raise LaunchError("elastic training needs the Gloo controller (Horovod elastic has no MPI mode)",
                          fix="drop --mpi")
    if opts.hosts and (opts.hostfile or opts.host_discovery_script) or (opts.hostfile and opts.host_discovery_script):
        raise LaunchError("more than one of -H, --hostfile and --host-discovery-script given",
                          fix="pass one source of hosts")
    script = opts.host_discovery_script
    if script and Path(script).exists() and not os.access(script, os.X_OK):
        raise LaunchError(f"host discovery script {script} is not executable", fix=f"chmod +x {script}")
    if script and not Path(script).exists() and " " not in script.strip():
        raise LaunchError(f"host discovery script {script} not found", fix="pass an executable that prints `host:slots` lines")
    if opts.hostfile and not Path(opts.hostfile).is_file():
        raise LaunchError(f"hostfile {opts.hostfile} not found",
                          fix="pass an existing file with lines like `node1 slots=2` (hvdkit reads it every second)")
    min_np = opts.min_np or opts.np
    if min_np < 1:
        raise LaunchError(f"--min-np {min_np} must be at least 1", fix="pass --min-np 1 or more")
    if opts.max_np is not None and opts.max_np < min_np:
        raise LaunchError(f"--max-np {opts.max_np} is below --min-np {min_np}", fix=f"pass --max-np {min_np} or more")
    low, high = opts.blacklist_cooldown or DEFAULT_BLACKLIST_COOLDOWN
    if not 1 <= low <= high <= 3600:
        raise LaunchError(f"--blacklist-cooldown-range {low} {high} is outside 1 <= low <= high <= 3600 s",
                          fix="e.g. --blacklist-cooldown-range 10 300")
    opts.np = max(opts.np, min_np)
    if opts.max_np is not None:
        opts.np = min(opts.np, opts.max_np)
    command = _discovery_command(opts)
    if command is None:
        hosts = parse_hosts(opts.hosts) if opts.hosts else []
        if len(hosts) < 2:
            raise LaunchError("elastic training needs a source of hosts that can change",
                              fix="pass --host-discovery-script SCRIPT, --hostfile FILE (hvdkit watches it) "
                                  "or -H with two hosts or more")
        return hosts
    return discover(command, opts.slots_per_host or 1)


def elastic_args(opts: LaunchOptions) -> list[str]:
    """horovodrun's elastic options for ``opts`` (checked by check_elastic)."""
    args = ["--min-np", str(opts.min_np or opts.np)]
    if opts.max_np is not None:
        args += ["--max-np", str(opts.max_np)]
    command = _discovery_command(opts)
    if command is not None:
        args += ["--host-discovery-script", command]
    elif opts.hosts:
        args += ["-H", opts.hosts]
    if opts.slots_per_host:
        args += ["--slots-per-host", str(opts.slots_per_host)]
    if opts.elastic_timeout:
        args += ["--elastic-timeout", str(opts.elastic_timeout)]
    if opts.reset_limit is not None:
        args += ["--reset-limit", str(opts.reset_limit)]
    low, high = opts.blacklist_cooldown or DEFAULT_BLACKLIST_COOLDOWN
    args += ["--blacklist-cooldown-range", str(low), str(high)]
    if opts.network_interface:
        args += ["--network-interfaces", opts.network_interface]
    return args


def set_elastic(opts: LaunchOptions, *, elastic: bool = False, min_np: int | None = None, max_np: int | None = None,
                host_discovery_script: str | None = None, slots_per_host: int | None = None,
                elastic_timeout: int | None = None, reset_limit: int | None = None,
                blacklist_cooldown_range: tuple[int, int] | None = None, network_interface: str | None = None) -> LaunchOptions:
    """The CLI's elastic flags onto ``opts``; any of --min-np/--max-np/--host-discovery-script means --elastic."""
    opts.elastic = bool(elastic or min_np is not None or max_np is not None or host_discovery_script)
    opts.min_np, opts.max_np, opts.host_discovery_script = min_np, max_np, host_discovery_script
    opts.slots_per_host, opts.elastic_timeout, opts.reset_limit = slots_per_host, elastic_timeout, reset_limit
    opts.blacklist_cooldown = tuple(blacklist_cooldown_range) if blacklist_cooldown_range else None
    opts.network_interface = network_interface
    if not opts.elastic and (slots_per_host or elastic_timeout or reset_limit is not None or blacklist_cooldown_range):
        raise LaunchError("elastic options given without --elastic", fix="add --elastic (or --min-np / --host-discovery-script)")
    return opts
