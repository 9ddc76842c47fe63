"""Slurm, the launch layer's other half: an allocation as hvdkit sees it, the ``srun`` line that
starts the ranks inside it, and the batch script ``hvdkit sbatch`` writes (and submits).

Why not horovodrun inside an allocation: horovodrun reaches other hosts over ssh, which Slurm
sites usually forbid between compute nodes. ``srun --mpi=pmix`` starts every rank through the
Slurm daemons instead, and Horovod then takes rank, size and local rank from MPI (its MPI
controller), so no HOROVOD_RANK/HOROVOD_HOSTNAME is needed; hvdkit.tracking.context reads
Slurm's task variables for the tags. Framework-free and Horovod-free (tests/test_layers.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvdkit.errors import LaunchError, UsageError
from hvdkit.tracking import _credentials

if TYPE_CHECKING:
    from hvdkit.launch import LaunchOptions
    from hvdkit.recipe import LoadedRecipe

LAUNCHERS = ("auto", "srun", "horovodrun")
SCONTROL_TIMEOUT_S = 30
SBATCH_TIMEOUT_S = 60
# "2(x3)" is three nodes of two tasks; a plain "1" one node of one.
_TPN = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def in_allocation(env: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if env is None else env).get("SLURM_JOB_ID"))


def choose_launcher(launcher: str, env: Mapping[str, str] | None = None) -> str:
    """``auto`` -> ``srun`` inside an allocation (SLURM_JOB_ID set), else ``horovodrun``."""
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}", fix="pass --launcher auto, srun or horovodrun")
    if launcher == "auto":
        return "srun" if in_allocation(env) else "horovodrun"
    if launcher == "srun" and not in_allocation(env):
        raise LaunchError("--launcher srun outside a Slurm allocation (SLURM_JOB_ID is not set)",
                          fix="run it inside salloc/sbatch (hvdkit sbatch RECIPE -N NODES --ntasks-per-node K --submit), "
                              "or drop --launcher srun")
    return launcher


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE, one count per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        m = _TPN.match(part)
        if not m:
            raise LaunchError(f"cannot read SLURM_TASKS_PER_NODE={spec!r} (part {part!r})",
                              fix="run inside an allocation made by salloc/sbatch, which sets it like `2(x3),1`")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not counts:
        raise LaunchError(f"SLURM_TASKS_PER_NODE={spec!r} names no node",
                          fix="run inside an allocation made by salloc/sbatch (-N NODES --ntasks-per-node K)")
    return counts


def expand_nodelist(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """``node[1-2],gpu7`` -> ``["node1", "node2", "gpu7"]``, by Slurm itself (``scontrol show
    hostnames``): its host-range grammar has enough corners (zero padding, nested ranges,
    suffixes) that a second parser would sooner or later disagree with it."""
    env = dict(os.environ if env is None else env)
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        raise LaunchError("SLURM_JOB_ID is set but scontrol is not on PATH (hvdkit needs it to expand SLURM_JOB_NODELIST)",
                          fix="add Slurm's bin directory to PATH (e.g. module load slurm), or pass --launcher horovodrun -H host:slots")
    try:
        res = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=SCONTROL_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"scontrol show hostnames {nodelist} did not answer within {SCONTROL_TIMEOUT_S} s",
                          fix="check that slurmctld answers (scontrol ping)") from None
    hosts = [h.strip() for h in res.stdout.splitlines() if h.strip()]
    if res.returncode != 0 or not hosts:
        said = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise LaunchError(f"scontrol show hostnames {nodelist} failed: {said}",
                          fix="check SLURM_JOB_NODELIST and that scontrol works here (scontrol ping)")
    return hosts


@dataclass(frozen=True)
class Allocation:
    """The Slurm job this process runs in, from the variables salloc/sbatch set."""

    job_id: str
    nodes: tuple[str, ...]
    tasks_per_node: tuple[int, ...]  # per node, same order
    ntasks: int  # SLURM_NTASKS, else the sum over nodes
    nodelist: str = ""
    partition: str | None = None
    cluster: str | None = None

    @property
    def hosts(self) -> list[tuple[str, int]]:
        return list(zip(self.nodes, self.tasks_per_node))


def allocation(env: Mapping[str, str] | None = None) -> Allocation:
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "")
    if not job_id:
        raise LaunchError("not inside a Slurm allocation (SLURM_JOB_ID is not set)", fix="run inside salloc/sbatch")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist:
        raise LaunchError(f"Slurm job {job_id}: SLURM_JOB_NODELIST is not set",
                          fix="run inside an allocation made by salloc/sbatch (srun steps and batch scripts set it)")
    nodes = expand_nodelist(nodelist, env)
    tpn_spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_JOB_TASKS_PER_NODE") or ""
    counts = parse_tasks_per_node(tpn_spec) if tpn_spec else [1] * len(nodes)
    if len(counts) != len(nodes):
        raise LaunchError(f"Slurm job {job_id}: SLURM_TASKS_PER_NODE={tpn_spec!r} counts {len(counts)} node(s), "
                          f"SLURM_JOB_NODELIST={nodelist!r} names {len(nodes)}",
                          fix="run hvdkit in the allocation's own environment (not one copied from another job)")
    ntasks_s = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or ""
    ntasks = int(ntasks_s) if ntasks_s.isdigit() and int(ntasks_s) > 0 else sum(counts)
    return Allocation(job_id=job_id, nodes=tuple(nodes), tasks_per_node=tuple(counts), ntasks=min(ntasks, sum(counts)),
                      nodelist=nodelist, partition=env.get("SLURM_JOB_PARTITION") or None,
                      cluster=env.get("SLURM_CLUSTER_NAME") or None)


def layout(alloc: Allocation, np: int) -> list[tuple[str, int]]:
    """Where ``np`` ranks go: the allocation's nodes filled in order (horovodrun fills -H the same
    way), so rank 0 lands on the first node, where a batch script itself runs. Raises when the
    allocation is too small: srun would wait for resources the job can never get, or fail late."""
    if np < 1:
        raise LaunchError(f"-np {np} must be at least 1", fix="pass -np 1 or more, or leave it out (the allocation's tasks)")
    if np > alloc.ntasks:
        raise LaunchError(f"-np {np} is larger than Slurm job {alloc.job_id}'s allocation of {alloc.ntasks} task(s) "
                          f"({','.join(f'{h}:{n}' for h, n in alloc.hosts)})",
                          fix=f"lower -np to {alloc.ntasks} (or leave it out), or allocate more tasks "
                              f"(salloc/sbatch -N NODES --ntasks-per-node K with NODES x K >= {np})")
    out, left = [], np
    for host, n in alloc.hosts:
        if left <= 0:
            break
        take = min(n, left)
        out.append((host, take))
        left -= take
    return out


def check_srun_options(opts: LaunchOptions) -> None:
    """horovodrun's host and ssh options mean nothing to srun: refused, not silently ignored."""
    given = [flag for flag, value in (("-H", opts.hosts), ("--hostfile", opts.hostfile), ("-p", opts.ssh_port),
                                      ("-i", opts.ssh_identity_file), ("--elastic", opts.elastic),
                                      ("--network-interface", opts.network_interface)) if value]
    if given:
        raise LaunchError(f"{', '.join(given)} do(es) not apply inside a Slurm allocation (srun places the ranks)",
                          fix=f"drop {given[0]}, or pass --launcher horovodrun to start the ranks over ssh")


def check_mpi_built() -> None:
    """srun-started ranks need Horovod's MPI controller (there is no Gloo rendezvous without horovodrun)."""
    from hvdkit.build import env as build_env

    build = build_env.installed_build() or {}
    controllers = build.get("controllers")
    if controllers and not controllers.get("mpi"):
        raise LaunchError("Horovod is built without MPI, which ranks started by srun need",
                          fix="hvdkit build-horovod --controllers gloo,mpi --force, or pass --launcher horovodrun")


def horovod_env(opts: LaunchOptions) -> dict[str, str]:
    """The HOROVOD_* variables horovodrun would set from hvdkit's launch flags
    (horovod.runner.common.util.config_parser.set_env_from_args, 0.28.1); srun only forwards
    an environment, so hvdkit sets them itself."""
    env = {"HOROVOD_CONTROLLER": "mpi"}  # also what the run's horovod.controller tag says
    if opts.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(opts.fusion_threshold_mb) * 1024 * 1024)
    if opts.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = str(opts.cycle_time_ms)
    if opts.timeline:
        env["HOROVOD_TIMELINE"] = str(Path(opts.timeline).resolve())
        env["HOROVOD_TIMELINE_MARK_CYCLES"] = "0"
    if opts.autotune:
        env["HOROVOD_AUTOTUNE"] = "1"
        if opts.autotune_log:
            env["HOROVOD_AUTOTUNE_LOG"] = str(Path(opts.autotune_log).resolve())
    return env


def srun_env(opts: LaunchOptions, placed: list[tuple[str, int]]) -> dict[str, str]:
    """srun's environment, which it forwards to every task (Slurm's default --export=ALL).

    It travels inside Slurm's launch request to each node's slurmd, signed by munge but not
    encrypted, so a job on more than one node leaves its secrets here, as a multi-host horovodrun
    job does (hvdkit.launch.forwarded_env), and rank 0 reads MLflow's credentials from the file
    in the home directory the nodes share; that file is checked now, on this node."""
    from hvdkit import launch as L

    opts.controller = "mpi"
    opts.multi_host = len(placed) > 1
    env, removed = L.forwarded_env(opts)
    if removed:
        print("hvdkit: kept on the launcher, not forwarded to the nodes: " + ", ".join(removed), file=sys.stderr, flush=True)
    if opts.multi_host and L._credentials_needed(opts, env, removed):
        source = _credentials.find_source(env)  # an unsafe or missing named file raises, one line
        if source.kind != "file" or not source.has_password:
            path = str(_credentials.credentials_path(env))
            said = "hvdkit-cred missing" if source.kind != "file" else "hvdkit-cred 600 0"
            raise L._credentials_error(placed[0][0], path, said)
    env.update(horovod_env(opts))
    return env


def srun_command(loaded: LoadedRecipe, alloc: Allocation, placed: list[tuple[str, int]], train_args: list[str],
                 overrides: list[str]) -> list[str]:
    """``srun --mpi=pmix -n NP [...] <venv python> -m hvdkit.train RECIPE ...``: the same
    hvdkit.train line horovodrun runs (hvdkit.launch.train_command)."""
    from hvdkit import launch as L

    srun = shutil.which("srun")
    if srun is None:
        raise LaunchError("SLURM_JOB_ID is set but srun is not on PATH",
                          fix="add Slurm's bin directory to PATH (e.g. module load slurm), or pass --launcher horovodrun")
    np = sum(n for _, n in placed)
    # --kill-on-bad-exit: a rank that fails ends the step; otherwise its peers wait in their next
    # allreduce for a rank that is gone, and the job never ends (nor its runs FAILED).
    cmd = [srun, "--mpi=pmix", "--kill-on-bad-exit=1", "-n", str(np)]
    if np < alloc.ntasks:
        # Part of the allocation: pin the nodes and the fill, else srun spreads the ranks its own
        # way (and rank 0 may leave the batch script's node).
        cmd += ["-N", str(len(placed)), f"--nodelist={','.join(h for h, _ in placed)}"]
        counts = {n for _, n in placed}
        if len(counts) == 1:
            cmd.append(f"--ntasks-per-node={counts.pop()}")
        # An uneven fill (3 ranks on 2+1): srun ignores --ntasks-per-node there (with a warning);
        # block alone fills the first node first.
        cmd.append("--distribution=block")
    return cmd + L.train_command(loaded, train_args, overrides)


# -- hvdkit sbatch -------------------------------------------------------------------------------

def split_extra(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``hvdkit sbatch``'s trailing words: (sbatch options for #SBATCH lines, recipe overrides).
    ``--opt=value`` and ``--flag`` are options; ``--opt value`` takes the next word when it is
    neither an option nor a ``key=value`` override."""
    options, overrides = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            if "=" not in a and a.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("-") \
                    and "=" not in args[i + 1]:
                options.append(f"{a}={args[i + 1]}")
                i += 2
                continue
            if not a.startswith("--") and len(a) == 2 and i + 1 < len(args) and not args[i + 1].startswith("-") \
                    and "=" not in args[i + 1]:
                options.append(f"{a} {args[i + 1]}")  # -A account
                i += 2
                continue
            options.append(a)
        else:
            overrides.append(a)
        i += 1
    return options, overrides


def _uri_without_password(uri: str) -> str:
    # user:password@host -> user@host: the password comes from a file on the nodes instead
    # (~/.mlflow/credentials for an MLflow server, ~/.pgpass for PostgreSQL).
    return _credentials._URI_PASSWORD.sub(lambda m: f"{m.group('pre')}@", uri)


def _hvdkit_executable() -> list[str]:
    exe = Path(sys.executable).parent / "hvdkit"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "hvdkit.cli"]


@dataclass
class BatchScript:
    text: str
    notes: list[str]  # one line each, for stderr (what was left out of the script, and why)


def batch_script(recipe: str, loaded: LoadedRecipe, *, nodes: int, ntasks_per_node: int, partition: str | None = None,
                 time_limit: str | None = None, job_name: str | None = None, output: str | None = None,
                 requeue: bool = False, sbatch_options: Sequence[str] = (), framework: str | None = None,
                 experiment: str | None = None, overrides: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> BatchScript:
    """The batch script, meant to be read and kept: ``#SBATCH`` lines, the environment hvdkit
    needs (no secret: Slurm stores a job's script and environment in its state files, readable by
    the Slurm admins, and copies them to the nodes), then ``exec hvdkit run ...``."""
    env = os.environ if env is None else env
    cwd = cwd or os.getcwd()
    if nodes < 1:
        raise UsageError(f"-N {nodes} must be at least 1", fix="pass -N 1 or more")
    if ntasks_per_node < 1:
        raise UsageError(f"--ntasks-per-node {ntasks_per_node} must be at least 1", fix="pass --ntasks-per-node 1 or more")
    q = shlex.quote
    notes: list[str] = []
    lines = ["#!/bin/bash",
             f"# Written by `hvdkit sbatch` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: recipe {loaded.recipe.name}, "
             f"{nodes} node(s) x {ntasks_per_node} rank(s).",
             "# Submit with `sbatch THIS_FILE` (hvdkit sbatch --submit does); keep it to run the same job again.",
             f"#SBATCH --job-name={job_name or 'hvdkit-' + loaded.recipe.name}",
             f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={ntasks_per_node}"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    if output:
        lines.append(f"#SBATCH --output={os.path.join(cwd, output)}")
    if requeue:
        lines.append("#SBATCH --requeue")
    for opt in sbatch_options:
        if "\n" in opt:
            raise UsageError(f"sbatch option {opt!r} spans lines", fix="pass each option on one line")
        lines.append(f"#SBATCH {opt}")
    if requeue:
        lines += ["# A requeue (preemption, a node lost) starts this script again with SLURM_RESTART_COUNT > 0:",
                  "# hvdkit run then continues the same job and MLflow runs from the last checkpoint."]
    lines += ["", "# hvdkit's environment (no password or token: rank 0 reads MLflow's credentials from",
              f"# {_credentials.DEFAULT_FILE} in the home directory the nodes share, mode 600)",
              f"export PATH={q(str(Path(sys.executable).parent))}:\"$PATH\"",
              "export PYTHONUNBUFFERED=1"]
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if uri:
        clean = _uri_without_password(uri)
        if clean != uri:
            notes.append(f"MLFLOW_TRACKING_URI {_credentials.mask_uri(uri)} written without its password; "
                         f"the nodes read it from {_credentials.DEFAULT_FILE} (MLflow server) or ~/.pgpass (PostgreSQL)")
        if not _credentials.is_secret("MLFLOW_TRACKING_URI", clean):
            lines.append(f"export MLFLOW_TRACKING_URI={q(clean)}")
    if env.get(_credentials.ENV_FILE):  # a path, not a secret
        lines.append(f"export {_credentials.ENV_FILE}={q(os.path.join(cwd, env[_credentials.ENV_FILE]))}")
    left_out = sorted(k for k, v in env.items() if k != "MLFLOW_TRACKING_URI" and k.startswith("MLFLOW_")
                      and _credentials.is_secret(k, v))
    if left_out:
        notes.append(f"left out of the script: {', '.join(left_out)} (rank 0 reads {_credentials.credentials_path(env)} instead)")
    cred = _credentials.credentials_path(env)
    if uri.startswith(("http://", "https://")) and (left_out or clean != uri) and not cred.is_file():
        notes.append(f"{cred} does not exist: create it (mode 600) in the home directory the nodes share, with "
                     f"[mlflow] / {_credentials.USERNAME_KEY} = USER / {_credentials.PASSWORD_KEY} = PASSWORD")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # Open MPI refuses root without both")
    recipe_arg = recipe
    file_part, sep, cls = recipe.rpartition(":") if ".py:" in recipe else (recipe, "", "")
    if Path(file_part).exists():
        recipe_arg = str(Path(cwd, file_part).resolve()) + (sep + cls if sep else "")
    args = [*_hvdkit_executable(), "run", recipe_arg]
    if framework:
        args += ["--framework", framework]
    if experiment:
        args += ["--experiment", experiment]
    args += list(overrides)
    lines += ["", "# Relative paths of the recipe (checkpoint.dir) and the default store sqlite:///mlflow.db",
              "# stay where hvdkit sbatch ran.", f"cd {q(cwd)}",
              "# exec: scancel's SIGTERM then reaches hvdkit run itself, which ends the runs KILLED",
              "# (a shell in between would die first and take the batch step down with it).",
              "exec " + " ".join(q(a) for a in args), ""]
    return BatchScript("\n".join(lines), notes)


def write_script(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755)
    except OSError as exc:
        raise UsageError(f"cannot write the batch script {path}: {exc.strerror or exc}",
                         fix="pass --script PATH in a directory you can write to") from None


_SBATCH_FIXES = (  # (what sbatch said, the script's options it is about, the fix)
    ("invalid partition", ("--partition",), "pick a partition sinfo lists (sinfo -s), or drop --partition for the default one"),
    ("Requested node configuration is not available", ("--nodes", "--ntasks-per-node"),
     "lower --ntasks-per-node to the CPUs of a node (sinfo -o '%n %c'), or add nodes (-N) instead"),
    ("More processors requested than permitted", ("--nodes", "--ntasks-per-node"),
     "lower -N or --ntasks-per-node to what the partition allows (sinfo -o '%P %D %c')"),
    ("Node count specification invalid", ("--nodes",), "lower -N to the nodes of the partition (sinfo -s)"),
    ("time limit", ("--time",), "lower --time to the partition's limit (sinfo -o '%P %l')"),
)


def _sbatch_values(script_path: str, names: tuple[str, ...]) -> str:
    """The script's ``#SBATCH`` values for ``names``, e.g. ``--partition=nosuch``: the bad value, named."""
    try:
        lines = Path(script_path).read_text().splitlines()
    except OSError:
        return ""
    found = [ln.split(None, 1)[1].strip() for ln in lines
             if ln.startswith("#SBATCH ") and ln.split(None, 1)[1].split("=", 1)[0].strip() in names]
    return " ".join(found)


def submit(script_path: str, env: Mapping[str, str] | None = None) -> str:
    """``sbatch SCRIPT``; returns Slurm's job id. sbatch's own refusal becomes one line with a fix.
    sbatch gets this environment minus its secrets: Slurm copies the submitting environment into
    the job (and its state files)."""
    env = dict(os.environ if env is None else env)
    sbatch = shutil.which("sbatch", path=env.get("PATH"))
    if sbatch is None:
        raise LaunchError("sbatch is not on PATH", fix="submit from a Slurm login node, or add Slurm's bin directory to PATH")
    clean, _ = _credentials.strip_secrets(env)
    if clean.get("MLFLOW_TRACKING_URI"):
        clean["MLFLOW_TRACKING_URI"] = _uri_without_password(env["MLFLOW_TRACKING_URI"])
    try:
        res = subprocess.run([sbatch, "--parsable", script_path], capture_output=True, text=True, env=clean,
                             timeout=SBATCH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"sbatch {script_path} did not answer within {SBATCH_TIMEOUT_S} s",
                          fix="check that slurmctld answers (scontrol ping), then: sbatch " + script_path) from None
    if res.returncode != 0:
        said = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()] or [f"sbatch exited with {res.returncode}"]
        last = said[-1].removeprefix("sbatch: error: ")
        hit = next((h for h in _SBATCH_FIXES if h[0].lower() in " ".join(said).lower()), None)
        if hit is None:
            raise LaunchError(f"sbatch refused the job: {last}",
                              fix=f"change the option sbatch names, then submit again (sbatch {script_path})")
        values = _sbatch_values(script_path, hit[1])
        raise LaunchError(f"sbatch refused the job{f' ({values})' if values else ''}: {last}", fix=hit[2])
    job_id = res.stdout.strip().split(";")[0].strip()
    if not job_id.isdigit():
        raise LaunchError(f"sbatch printed {res.stdout.strip()!r}, not a job id", fix=f"check the queue (squeue --me) and sbatch {script_path}")
    return job_id


__all__ = ["Allocation", "BatchScript", "LAUNCHERS", "allocation", "batch_script", "check_mpi_built", "check_srun_options",
           "choose_launcher", "expand_nodelist", "horovod_env", "in_allocation", "layout", "parse_tasks_per_node",
           "split_extra", "srun_command", "srun_env", "submit", "write_script"]
