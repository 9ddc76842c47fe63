"""hvdkit's Slurm side without a cluster: allocation parsing, the srun line, the batch script, and
sbatch's errors, with fake ``scontrol`` / ``srun`` / ``sbatch`` shell scripts on PATH (pure logic;
tests/test_slurm.py runs the real thing on a two-node cluster)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, REPO, hvdkit, worker_env

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

DIGITS = str(REPO / "recipes" / "digits.yaml")

# Prints the nodes of the two node lists the tests use, as `scontrol show hostnames` does.
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || { echo "scontrol: error: unexpected $*" >&2; exit 1; }
case "$3" in
  'n[1-2]') printf 'n1\\nn2\\n' ;;
  'gpu[01-03],cpu7') printf 'gpu01\\ngpu02\\ngpu03\\ncpu7\\n' ;;
  *) echo "scontrol: error: Invalid hostlist: $3" >&2; exit 1 ;;
esac
"""
# Records its argument list, one per line, and the variables the tests look at; exits $FAKE_RC.
FAKE_SRUN = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_OUT/srun.args"
env > "$FAKE_OUT/srun.env"
exit "${FAKE_RC:-0}"
"""
# Waits to be stopped; records the signal it got.
WAITING_SRUN = """#!/bin/sh
trap 'echo TERM > "$FAKE_OUT/srun.signal"; exit 143' TERM
trap 'echo INT > "$FAKE_OUT/srun.signal"; exit 130' INT
touch "$FAKE_OUT/srun.started"
while :; do sleep 0.05; done
"""


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    d = tmp_path / "fakebin"
    d.mkdir(exist_ok=True)
    for name, text in scripts.items():
        p = d / name
        p.write_text(text)
        p.chmod(0o755)
    return d


def _slurm_env(tmp_path: Path, fake: Path, *, path_rest: str | None = None, **extra: str) -> dict[str, str]:
    """A job environment inside a fake 2-node allocation of 2 tasks per node; PATH: the fakes, this
    venv, and (unless ``path_rest``) the rest of the caller's PATH."""
    env = {k: v for k, v in worker_env().items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    rest = os.environ.get("PATH", "") if path_rest is None else path_rest
    env.update(PATH=os.pathsep.join(p for p in (str(fake), str(BIN), rest) if p), TMPDIR=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="n[1-2]", SLURM_TASKS_PER_NODE="2(x2)", SLURM_NTASKS="4",
               SLURM_JOB_PARTITION="debug", SLURM_CLUSTER_NAME="hvdkit", FAKE_OUT=str(tmp_path))
    env.update(extra)
    return env


# -- allocation --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, counts", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1(x2)", [1, 1]), ("3,2(x2)", [3, 2, 2])])
def test_tasks_per_node_forms(spec, counts):
    from hvdkit.launch.slurm import parse_tasks_per_node

    assert parse_tasks_per_node(spec) == counts


def test_tasks_per_node_garbage_is_one_line():
    from hvdkit.launch.slurm import parse_tasks_per_node
    from hvdkit.errors import LaunchError

    with pytest.raises(LaunchError) as exc:
        parse_tasks_per_node("2(y3)")
    assert exc.value.exit_code == 2 and "SLURM_TASKS_PER_NODE" in str(exc.value) and "fix:" in str(exc.value)


def test_allocation_from_env_and_scontrol(tmp_path):
    from hvdkit.launch.slurm import allocation

    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL)
    env = _slurm_env(tmp_path, fake, SLURM_JOB_NODELIST="gpu[01-03],cpu7", SLURM_TASKS_PER_NODE="2(x3),1",
                     SLURM_NTASKS="7")
    a = allocation(env)
    assert a.nodes == ("gpu01", "gpu02", "gpu03", "cpu7") and a.tasks_per_node == (2, 2, 2, 1)
    assert a.ntasks == 7 and a.partition == "debug" and a.cluster == "hvdkit" and a.job_id == "4242"
    env.pop("SLURM_NTASKS")  # salloc -N without -n: the tasks per node decide
    assert allocation(env).ntasks == 7


def test_allocation_node_count_mismatch(tmp_path):
    from hvdkit.launch.slurm import allocation
    from hvdkit.errors import LaunchError

    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL)
    with pytest.raises(LaunchError, match="counts 3 node"):
        allocation(_slurm_env(tmp_path, fake, SLURM_TASKS_PER_NODE="1(x3)"))


def test_no_scontrol_is_one_line(tmp_path):
    from hvdkit.launch.slurm import allocation
    from hvdkit.errors import LaunchError

    empty = _fake_bin(tmp_path)
    with pytest.raises(LaunchError) as exc:
        allocation(_slurm_env(tmp_path, empty, path_rest=""))
    assert "scontrol is not on PATH" in str(exc.value) and "fix:" in str(exc.value)


def test_launcher_choice():
    from hvdkit.launch.slurm import choose_launcher
    from hvdkit.errors import LaunchError

    assert choose_launcher("auto", {"SLURM_JOB_ID": "1"}) == "srun"
    assert choose_launcher("auto", {}) == "horovodrun"
    assert choose_launcher("horovodrun", {"SLURM_JOB_ID": "1"}) == "horovodrun"
    with pytest.raises(LaunchError, match="outside a Slurm allocation"):
        choose_launcher("srun", {})


# -- the srun line -----------------------------------------------------------------------------

def _alloc():
    from hvdkit.launch.slurm import Allocation

    return Allocation(job_id="4242", nodes=("n1", "n2"), tasks_per_node=(2, 2), ntasks=4, nodelist="n[1-2]")


def test_srun_command_whole_and_part_of_the_allocation(tmp_path, monkeypatch):
    from hvdkit import launch
    from hvdkit.launch.slurm import layout, srun_command
    from hvdkit.recipe import load_recipe

    fake = _fake_bin(tmp_path, srun=FAKE_SRUN)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    loaded = load_recipe(DIGITS, ["epochs=2"])
    tail = launch.train_command(loaded, ["--no-track"], ["epochs=2"])
    assert tail[:3] == [sys.executable, "-m", "hvdkit.train"] and tail[-2:] == ["--no-track", "epochs=2"]

    whole = srun_command(loaded, _alloc(), layout(_alloc(), 4), ["--no-track"], ["epochs=2"])
    assert whole == [str(fake / "srun"), "--mpi=pmix", "--kill-on-bad-exit=1", "-n", "4", *tail]
    three = srun_command(loaded, _alloc(), layout(_alloc(), 3), ["--no-track"], ["epochs=2"])
    assert three[:9] == [str(fake / "srun"), "--mpi=pmix", "--kill-on-bad-exit=1", "-n", "3", "-N", "2",
                         "--nodelist=n1,n2", "--distribution=block"]  # 2+1: block fills n1 first
    assert layout(_alloc(), 2) == [("n1", 2)]  # rank 0 stays on the first node
    one_node = srun_command(loaded, _alloc(), layout(_alloc(), 2), [], [])
    assert one_node[5:9] == ["-N", "1", "--nodelist=n1", "--ntasks-per-node=2"]


def test_np_larger_than_the_allocation():
    from hvdkit.launch.slurm import layout
    from hvdkit.errors import LaunchError

    with pytest.raises(LaunchError) as exc:
        layout(_alloc(), 5)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "-np 5" in msg and "4 task(s)" in msg and "lower -np to 4" in msg


def test_srun_env_knobs_and_secrets(monkeypatch):
    from hvdkit import launch
    from hvdkit.launch.slurm import srun_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    opts = launch.LaunchOptions(np=4, fusion_threshold_mb=64, cycle_time_ms=2.5, autotune=True)
    env = srun_env(opts, [("n1", 2), ("n2", 2)])
    assert env["HOROVOD_CONTROLLER"] == "mpi" and env["HOROVOD_FUSION_THRESHOLD"] == str(64 * 1024 * 1024)
    assert env["HOROVOD_CYCLE_TIME"] == "2.5" and env["HOROVOD_AUTOTUNE"] == "1"
    assert "MLFLOW_TRACKING_PASSWORD" not in env  # two nodes: Slurm's launch request crosses the network
    one = srun_env(launch.LaunchOptions(np=2), [("n1", 2)])
    assert one["MLFLOW_TRACKING_PASSWORD"] == "s3cret-pw"  # one node: as horovodrun on one host


def test_run_inside_allocation_starts_srun(tmp_path):
    """`hvdkit run` in a (fake) allocation: srun with the allocation's size, the hvdkit.train line,
    the job id from SLURM_JOB_ID, no horovodrun; a failing srun is the job's exit code."""
    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN)
    env = _slurm_env(tmp_path, fake)
    ck = tmp_path / "ck"
    res = hvdkit(["run", DIGITS, "--no-track", f"checkpoint.dir={ck}", "--fusion-threshold-mb", "32"], env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:4] == ["--mpi=pmix", "--kill-on-bad-exit=1", "-n", "4"]
    assert args[4:7] == [sys.executable, "-m", "hvdkit.train"] and "--no-track" in args and f"checkpoint.dir={ck}" in args
    assert not any("horovodrun" in a for a in args)
    srun_vars = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_vars["HVDKIT_JOB_ID"] == "slurm-4242" and srun_vars["HOROVOD_CONTROLLER"] == "mpi"
    assert srun_vars["HOROVOD_FUSION_THRESHOLD"] == str(32 * 1024 * 1024)
    # a second job of the same allocation gets the next id; a failing srun is a failed job
    res = hvdkit(["run", DIGITS, "--no-track", f"checkpoint.dir={ck}", "-np", "3"], env={**env, "FAKE_RC": "3"}, timeout=120)
    assert res.returncode == 3 and "srun exited with 3" in res.stderr
    srun_vars = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert srun_vars["HVDKIT_JOB_ID"] == "slurm-4242-2"
    assert (tmp_path / "srun.args").read_text().splitlines()[3:9] == [
        "3", "-N", "2", "--nodelist=n1,n2", "--distribution=block", sys.executable]


def test_run_np_larger_than_allocation_exits_2(tmp_path):
    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN)
    ck = tmp_path / "ck"
    res = hvdkit(["run", DIGITS, "-np", "5", "--no-track", f"checkpoint.dir={ck}"], env=_slurm_env(tmp_path, fake), timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "-np 5" in lines[0] and "4 task(s)" in lines[0] and "fix:" in lines[0], res.stderr
    assert not (tmp_path / "srun.args").exists() and not ck.exists()


def test_run_without_scontrol_exits_2(tmp_path):
    fake = _fake_bin(tmp_path, srun=FAKE_SRUN)
    res = hvdkit(["run", DIGITS, "--no-track"], env=_slurm_env(tmp_path, fake, path_rest=""), timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "scontrol is not on PATH" in lines[0] and "fix:" in lines[0]
    assert not (tmp_path / "srun.args").exists()


def test_run_host_options_refused_under_srun(tmp_path):
    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN)
    res = hvdkit(["run", DIGITS, "--no-track", "--launcher", "srun", "-H", "a:2"], env=_slurm_env(tmp_path, fake), timeout=120)
    assert res.returncode == 2 and "--launcher horovodrun" in res.stderr
    assert not (tmp_path / "srun.args").exists()


def test_ctrl_c_reaches_srun_as_sigterm(tmp_path):
    """srun stops its tasks on SIGTERM only (a lone SIGINT prints their status): hvdkit run turns
    a Ctrl-C into SIGTERM for srun and reports the job interrupted."""
    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL, srun=WAITING_SRUN)
    proc = subprocess.Popen([str(BIN / "hvdkit"), "run", DIGITS, "--no-track"], env=_slurm_env(tmp_path, fake), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (tmp_path / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (tmp_path / "srun.signal").read_text().strip() == "TERM"
    assert proc.returncode == 130 and "job interrupted (SIGINT)" in err


# -- job ids -------------------------------------------------------------------------------------

def test_job_id_from_slurm_job_id(tmp_path, monkeypatch):
    import tempfile

    from hvdkit.core import job

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    env = {"SLURM_JOB_ID": "777"}
    ck = tmp_path / "ck"
    assert job.new_job_id(ck, env) == "slurm-777"
    assert job.new_job_id(ck, env) == "slurm-777-2"  # the same allocation's next job
    (ck / "slurm-777-3").mkdir(parents=True)  # a folder another node's launcher made
    assert job.new_job_id(ck, env) == "slurm-777-4"
    assert job.new_job_id(None, {"SLURM_JOB_ID": "778", "SLURM_RESTART_COUNT": "2"}) == "slurm-778-r2"
    assert not job.new_job_id(None, {}).startswith("slurm-")


def test_requeue_continues_the_derived_job(tmp_path, monkeypatch):
    from hvdkit.core.job import JobFolder, slurm_requeue_spec
    from hvdkit.recipe import load_recipe

    recipe = load_recipe(DIGITS, [f"checkpoint.dir={tmp_path}"]).recipe
    JobFolder.for_recipe(tmp_path, "slurm-31").update(status="KILLED", recipe=recipe.model_dump(mode="json"), np=4)
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert slurm_requeue_spec(recipe) is None  # the first start is a new job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm_requeue_spec(recipe) == "slurm-31"


# -- tags ----------------------------------------------------------------------------------------

def test_tags_of_an_srun_task(monkeypatch):
    from hvdkit.tracking import context

    for k in [k for k in os.environ if k.startswith(("HOROVOD_", "OMPI_COMM_WORLD", "PMI", "SLURM"))]:
        monkeypatch.delenv(k)
    for k, v in dict(SLURM_JOB_ID="55", SLURM_STEP_ID="0", SLURM_PROCID="3", PMIX_RANK="3", SLURM_STEP_NUM_TASKS="4",
                     SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURMD_NODENAME="node-b",
                     SLURM_JOB_PARTITION="debug", SLURM_JOB_NODELIST="node-[a-b]", SLURM_CLUSTER_NAME="c1").items():
        monkeypatch.setenv(k, v)
    tags = context.horovod_tags()
    assert tags["horovod.rank"] == "3" and tags["horovod.size"] == "4" and tags["horovod.local_size"] == "2"
    assert tags["horovod.hostname"] == "node-b" and tags["horovod.controller"] == "mpi"
    assert {k: v for k, v in tags.items() if k.startswith("slurm.")} == {
        "slurm.job_id": "55", "slurm.partition": "debug", "slurm.nodelist": "node-[a-b]", "slurm.cluster": "c1"}
    from hvdkit.tracking._job import World

    w = World.from_horovod_env(3, 4)
    assert (w.local_rank, w.local_size) == (1, 2)
    monkeypatch.delenv("PMIX_RANK")  # the batch script itself: not a rank
    assert context._launch() is None


# -- hvdkit sbatch -------------------------------------------------------------------------------

def test_sbatch_script_has_no_secret(tmp_path):
    env = _slurm_env(tmp_path, _fake_bin(tmp_path), MLFLOW_TRACKING_URI="http://alice:pw-in-uri@mlflow.example:5000",
                     MLFLOW_TRACKING_PASSWORD="env-secret-pw", MLFLOW_TRACKING_USERNAME="alice",
                     MLFLOW_TRACKING_TOKEN="tok-secret")
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    script = tmp_path / "job.sbatch"
    res = hvdkit(["sbatch", "recipes/digits.yaml", "-N", "2", "--ntasks-per-node", "4", "--partition", "gpu", "--time", "0:30:00",
                  "--requeue", "--script", str(script), "--mem=4G", "--framework", "tensorflow", "--experiment", "exp1",
                  "epochs=3", "optimizer.lr=0.1"], env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert res.stdout == text  # printed as written
    for secret in ("pw-in-uri", "env-secret-pw", "tok-secret"):
        assert secret not in text and secret not in res.stderr
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=0:30:00",
                 "#SBATCH --requeue", "#SBATCH --mem=4G", "#SBATCH --job-name=hvdkit-digits",
                 "export MLFLOW_TRACKING_URI=http://alice@mlflow.example:5000", f"cd {REPO}"):
        assert line in text.splitlines(), line
    run_line = [ln for ln in text.splitlines() if ln.startswith("exec ")]
    assert run_line == [f"exec {BIN / 'hvdkit'} run {REPO / 'recipes' / 'digits.yaml'} --framework tensorflow "
                        "--experiment exp1 epochs=3 optimizer.lr=0.1"]
    assert f"export PATH={BIN}:" in text
    assert ("OMPI_ALLOW_RUN_AS_ROOT=1" in text) == (os.geteuid() == 0)
    sb = [i for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH")]
    assert max(sb) < min(i for i, ln in enumerate(text.splitlines()) if ln and not ln.startswith("#"))


def test_sbatch_default_script_path_and_recipe_error(tmp_path):
    env = _slurm_env(tmp_path, _fake_bin(tmp_path))
    res = hvdkit(["sbatch", DIGITS, "-N", "1", "--ntasks-per-node", "2"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hvdkit-digits.sbatch").is_file()
    assert "#SBATCH --requeue" not in (tmp_path / "hvdkit-digits.sbatch").read_text()
    bad = hvdkit(["sbatch", DIGITS, "-N", "1", "--ntasks-per-node", "2", "epochs=many", "--script", "x.sbatch", "--submit"],
                 env=env, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "epochs" in bad.stderr
    assert not (tmp_path / "x.sbatch").exists()


FAKE_SBATCH = """#!/bin/sh
env > "$FAKE_OUT/sbatch.env"
case "$FAKE_SBATCH" in
  partition) echo "sbatch: error: invalid partition specified: nope" >&2; exit 1 ;;
  cpus) echo "sbatch: error: Batch job submission failed: Requested node configuration is not available" >&2; exit 1 ;;
  *) echo "4711"; exit 0 ;;
esac
"""


@pytest.mark.parametrize("kind, said, fix", [
    ("partition", "invalid partition specified: nope", "sinfo"),
    ("cpus", "Requested node configuration is not available", "lower --ntasks-per-node"),
])
def test_sbatch_errors_pass_through(tmp_path, kind, said, fix):
    env = _slurm_env(tmp_path, _fake_bin(tmp_path, sbatch=FAKE_SBATCH), FAKE_SBATCH=kind)
    res = hvdkit(["sbatch", DIGITS, "-N", "1", "--ntasks-per-node", "64", "--partition", "nope", "--submit"], env=env, cwd=tmp_path)
    assert res.returncode == 2
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: error:")]
    assert len(err) == 1 and said in err[0] and "fix:" in err[0] and fix in err[0], res.stderr
    assert "Submitted batch job" not in res.stdout


def test_sbatch_submit_prints_the_job_id_and_keeps_secrets_out(tmp_path):
    env = _slurm_env(tmp_path, _fake_bin(tmp_path, sbatch=FAKE_SBATCH), MLFLOW_TRACKING_PASSWORD="env-secret-pw",
                     MLFLOW_TRACKING_URI="http://bob:uri-secret@mlflow:5000")
    res = hvdkit(["sbatch", DIGITS, "-N", "2", "--ntasks-per-node", "1", "--submit"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "Submitted batch job 4711"
    seen = (tmp_path / "sbatch.env").read_text()
    assert "env-secret-pw" not in seen and "uri-secret" not in seen  # Slurm stores the submitting environment


def test_horovodrun_launcher_takes_the_allocations_hosts(tmp_path):
    """--launcher horovodrun inside an allocation: -H from its nodes (checked against -np as usual)."""
    fake = _fake_bin(tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN)
    res = hvdkit(["run", DIGITS, "--no-track", "--launcher", "horovodrun", "-np", "5"], env=_slurm_env(tmp_path, fake), timeout=120)
    assert res.returncode == 2 and "-np 5 is larger than the 4 slot(s) of the hosts (n1:2,n2:2)" in res.stderr, res.stderr
    assert not (tmp_path / "srun.args").exists()


def test_sbatch_names_a_missing_credentials_file(tmp_path):
    env = _slurm_env(tmp_path, _fake_bin(tmp_path), HOME=str(tmp_path), MLFLOW_TRACKING_URI="https://mlflow.example",
                     MLFLOW_TRACKING_PASSWORD="pw-9")
    res = hvdkit(["sbatch", DIGITS, "-N", "2", "--ntasks-per-node", "1"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"{tmp_path}/.mlflow/credentials does not exist" in res.stderr and "pw-9" not in res.stderr + res.stdout
