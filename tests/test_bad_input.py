"""Bad input: one line naming the field and the fix, exit code 2, no worker started, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, hvdkit

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes


def test_unknown_framework_lists_choices():
    res = hvdkit(["run", "recipes/digits.yaml", "--framework", "jax"])
    assert res.returncode == 2 and "jax" in res.stderr and "torch" in res.stderr and "tensorflow" in res.stderr


def test_malformed_recipe_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: mlp\n")
    res = hvdkit(["run", str(bad)])
    assert res.returncode == 2 and "not valid YAML at line" in res.stderr


def test_unknown_field_lists_valid_fields(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptimizer: {name: sgd, lrate: 0.1}\n")
    res = hvdkit(["run", str(bad)])
    assert res.returncode == 2 and "optimizer.lrate" in res.stderr and "lr, momentum" in res.stderr


def test_build_horovod_unknown_version(tmp_path):
    res = hvdkit(["build-horovod", "--horovod-version", "0.99.0"], env=None)
    assert res.returncode == 2
    assert "unknown --horovod-version '0.99.0'" in res.stderr and "0.28.1" in res.stderr


def _env_with_path(path: str) -> dict:
    from conftest import worker_env

    env = worker_env(PATH=path)
    env.pop("CXX", None)
    return env


def test_build_horovod_without_compiler(tmp_path):
    res = hvdkit(["build-horovod", "--no-install"], env=_env_with_path(str(tmp_path)))
    assert res.returncode == 2 and "no C++ compiler found" in res.stderr and "apt-get install g++" in res.stderr


def test_build_horovod_without_cmake(tmp_path):
    import shutil

    (tmp_path / "g++").symlink_to(shutil.which("g++"))
    res = hvdkit(["build-horovod", "--no-install"], env=_env_with_path(str(tmp_path)))
    assert res.returncode == 2 and "cmake not found" in res.stderr and "fix:" in res.stderr


def test_build_horovod_without_any_framework(monkeypatch):
    """Pure logic (a venv without torch and TF would cost minutes to make): the check before building."""
    from hvdkit.build import BuildPlan
    from hvdkit.build import env as build_env
    from hvdkit.build._horovod import resolve
    from hvdkit.errors import BuildError

    monkeypatch.setattr(build_env, "framework_version", lambda fw: None)
    with pytest.raises(BuildError, match="no deep-learning framework is installed") as exc:
        resolve(BuildPlan())
    assert "hvdkit[torch]" in str(exc.value)


def test_build_horovod_with_corrupted_cached_wheel(tmp_path):
    """A real CLI run against a cache whose wheel was damaged: error, entry removed, exit 2."""
    import zipfile

    from hvdkit.build import BuildPlan, WheelCache
    from hvdkit.build._horovod import resolve
    from conftest import worker_env

    key, _ = resolve(BuildPlan())
    cache = WheelCache(tmp_path)
    wheel = tmp_path / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("horovod/__init__.py", "x = 1\n" * 100)
    stored = cache.store(key, wheel)
    stored.wheel.write_bytes(stored.wheel.read_bytes()[:-20])  # truncated, as by a full disk
    res = hvdkit(["build-horovod", "--no-install"], env=worker_env(HVDKIT_CACHE_DIR=str(tmp_path)))
    assert res.returncode == 2, res.stderr
    assert "is corrupted" in res.stderr and "run `hvdkit build-horovod` again" in res.stderr
    assert not cache.entry_dir(key).exists()


def test_framework_not_built_into_horovod(monkeypatch):
    """Pure logic (a Horovod built without TF costs a rebuild): the launcher's check and its message."""
    from hvdkit import launch
    from hvdkit.build import env as build_env
    from hvdkit.errors import LaunchError

    monkeypatch.setattr(build_env, "installed_build", lambda: None)
    monkeypatch.setattr(build_env, "probe_horovod", lambda fws: {fw: {"ok": False, "error": "ImportError: no mpi_lib"} for fw in fws})
    with pytest.raises(LaunchError) as exc:
        launch.check_framework_built("tensorflow")
    assert exc.value.exit_code == 2
    assert "Horovod is not built with tensorflow" in str(exc.value) and "hvdkit build-horovod --frameworks tensorflow" in str(exc.value)


# -- the catalogue: every kind of bad input, through the real CLI --------------------------------
# Each case: one line on stderr naming the bad value and the fix ("fix:"), exit 2, no worker
# started, and nothing half-written: no MLflow run left (the store, if one appeared, holds no
# RUNNING run), no spool, and the job folders exactly as they were.
DIGITS = str(REPO / "recipes" / "digits.yaml")
_FINISHED_JOB = "20260101-000000-aaaaaaaa"
_CORRUPT_JOB = "20260101-000001-bbbbbbbb"


def _catalogue_files(root: Path) -> dict[str, str]:
    """The files the catalogue's cases point at, made once per case in ``root``."""
    from hvdkit.core.job import JobFolder, sha256_file
    from hvdkit.recipe import load_recipe

    ck = root / "ck"
    recipe = load_recipe(str(REPO / DIGITS), [f"checkpoint.dir={ck}"]).recipe.model_dump(mode="json")
    done = JobFolder.for_recipe(ck, _FINISHED_JOB)
    done.update(status="FINISHED", np=1, steps=660, recipe=recipe, created_ms=1)
    broken = JobFolder.for_recipe(ck, _CORRUPT_JOB)
    (ck / _CORRUPT_JOB).mkdir(parents=True, exist_ok=True)
    ckpt = ck / _CORRUPT_JOB / "ckpt-e0001.pt"
    ckpt.write_bytes(b"a checkpoint as written" * 100)
    digest = sha256_file(ckpt)
    ckpt.write_bytes(b"a checkpoint as torn by" * 100)  # same size, other bytes
    broken.update(status="FAILED", np=1, recipe=recipe, created_ms=2, last_checkpoint=ckpt.name,
                  checkpoints={ckpt.name: {"sha256": digest, "epoch": 0, "step": 22}})
    files = {"ck": str(ck), "root": str(root)}
    for name, text in {"hosts_zero": "localhost slots=0\n", "hosts_word": "localhost slots=two\n",
                       "hosts_empty": "# no hosts yet\n\n", "hosts_bad": "local host slots=2\n"}.items():
        (root / name).write_text(text)
        files[name] = str(root / name)
    spool = root / "spool-corrupt"
    spool.mkdir()
    (spool / "meta.json").write_text(json.dumps({"format": 1, "job_id": "x", "tracking_uri": "sqlite:///x.db"}))
    (spool / "events.jsonl").write_text('{"op": "log_batch", "ref": "parent"\n{"op": "end_run"}\n')
    files["spool_corrupt"] = str(spool)
    future = root / "spool-future"
    future.mkdir()
    (future / "meta.json").write_text(json.dumps({"format": 99, "job_id": "x", "tracking_uri": "sqlite:///x.db"}))
    (future / "events.jsonl").write_text("")
    files["spool_future"] = str(future)
    cred = root / "credentials-open"  # an MLflow credentials file everyone can read
    cred.write_text("[mlflow]\nmlflow_tracking_username = u\nmlflow_tracking_password = p\n")
    cred.chmod(0o644)
    files["cred_open"] = str(cred)
    discover = root / "discover.sh"
    discover.write_text("#!/bin/sh\necho localhost:2\n")  # not executable
    files["discover_noexec"] = str(discover)
    return files


# (id, argv with {placeholders} from _catalogue_files, extra environment, what the line must name)
CATALOGUE = [
    # recipe and its overrides
    ("recipe-missing", ["run", "recipes/nope.yaml"], {}, "recipes/nope.yaml not found"),
    ("model-name", ["run", DIGITS, "model.name=transformer"], {}, "model.name"),
    ("data-name", ["run", DIGITS, "data.name=imagenet"], {}, "data.name"),
    ("optimizer-name", ["run", DIGITS, "optimizer.name=lion"], {}, "optimizer.name"),
    ("batch-size-zero", ["run", DIGITS, "batch_size=0"], {}, "batch_size"),
    ("lr-negative", ["run", DIGITS, "optimizer.lr=-1"], {}, "optimizer.lr"),
    ("lr-decay-name", ["run", DIGITS, "lr_schedule.decay=exponential"], {}, "lr_schedule.decay"),
    ("lr-final-fraction", ["run", DIGITS, "lr_schedule.final_lr_fraction=2"], {}, "lr_schedule.final_lr_fraction"),
    ("override-typo", ["run", DIGITS, "optimizr.lr=0.1"], {}, "unknown override key 'optimizr.lr'"),
    ("epochs-word", ["run", DIGITS, "epochs=many"], {}, "epochs"),
    ("override-not-kv", ["run", DIGITS, "lr"], {}, "not key=value"),
    # launcher flags
    ("np-over-slots", ["run", DIGITS, "-np", "3", "-H", "localhost:2"], {}, "-np 3 is larger than the 2 slot"),
    ("np-zero", ["run", DIGITS, "-np", "0"], {}, "-np 0"),
    ("fusion-fraction", ["run", DIGITS, "--fusion-threshold-mb", "2.5"], {}, "--fusion-threshold-mb 2.5"),
    ("fusion-negative", ["run", DIGITS, "--fusion-threshold-mb", "-1"], {}, "--fusion-threshold-mb -1"),
    ("cycle-time-zero", ["run", DIGITS, "--cycle-time-ms", "0"], {}, "--cycle-time-ms 0"),
    ("ssh-port", ["run", DIGITS, "-p", "70000"], {}, "-p 70000"),
    ("ssh-key-missing", ["run", DIGITS, "-i", "{root}/no-such-key"], {}, "no-such-key"),
    ("autotune-log-alone", ["run", DIGITS, "--autotune-log", "{root}/at.csv"], {}, "--autotune-log"),
    ("timeline-dir-missing", ["run", DIGITS, "--timeline", "{root}/nodir/t.json"], {}, "nodir"),
    ("force-alone", ["run", DIGITS, "--force"], {}, "--force without --resume"),
    ("hosts-and-hostfile", ["run", DIGITS, "-H", "localhost:2", "--hostfile", "{hosts_zero}"], {}, "both -H and --hostfile"),
    ("host-spec", ["run", DIGITS, "-H", "local host:2"], {}, "local host"),
    ("host-slots-word", ["run", DIGITS, "-H", "localhost:two"], {}, "localhost:two"),
    # hostfile lines
    ("hostfile-missing", ["run", DIGITS, "--hostfile", "{root}/no-hosts"], {}, "no-hosts"),
    ("hostfile-slots-zero", ["run", DIGITS, "--hostfile", "{hosts_zero}"], {}, "slots=0"),
    ("hostfile-slots-word", ["run", DIGITS, "--hostfile", "{hosts_word}"], {}, "slots=two"),
    ("hostfile-empty", ["run", DIGITS, "--hostfile", "{hosts_empty}"], {}, "lists no host"),
    ("hostfile-two-words", ["run", DIGITS, "--hostfile", "{hosts_bad}"], {}, "local host slots=2"),
    # an unreachable host: a loopback address no sshd answers on (nothing leaves the machine)
    ("host-unreachable", ["run", DIGITS, "-np", "1", "-H", "127.0.0.9:1", "-p", "{closed_port}"], {}, "127.0.0.9"),
    # tracking stores
    ("store-scheme", ["run", DIGITS], {"MLFLOW_TRACKING_URI": "nosuchstore://x"}, "nosuchstore"),
    ("store-sqlite-dir", ["run", DIGITS], {"MLFLOW_TRACKING_URI": "sqlite:///{root}/nodir/mlflow.db"}, "nodir"),
    ("experiment-empty", ["run", DIGITS, "--experiment", " "], {}, "experiment name"),
    # credentials: a file others can read, a named file that is missing, a password a remote rank would see
    ("credentials-file-open", ["run", DIGITS], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed_port}",
                                                "HVDKIT_MLFLOW_CREDENTIALS": "{cred_open}"}, "chmod 600 {cred_open}"),
    ("credentials-file-missing", ["run", DIGITS], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed_port}",
                                                   "HVDKIT_MLFLOW_CREDENTIALS": "{root}/no-credentials"}, "no-credentials"),
    ("tracking-uri-password-remote", ["run", DIGITS, "-np", "1", "-H", "127.0.0.9:1", "-p", "{closed_port}"],
     {"MLFLOW_TRACKING_URI": "http://u:hunter2@127.0.0.1:{closed_port}"}, "http://u:***@127.0.0.1:"),
    # spools
    ("sync-not-a-spool", ["sync", "{root}"], {}, "is not an hvdkit spool"),
    ("sync-corrupt-spool", ["sync", "{spool_corrupt}"], {}, "corrupt event at byte 0"),
    ("sync-future-spool", ["sync", "{spool_future}"], {}, "format 99"),
    # checkpoints and --resume
    ("resume-unknown", ["run", DIGITS, "checkpoint.dir={ck}", "--resume", "20990101-000000-deadbeef"], {}, "no job"),
    ("resume-finished", ["run", DIGITS, "checkpoint.dir={ck}", "--resume", _FINISHED_JOB], {}, "FINISHED"),
    ("resume-corrupt-checkpoint", ["run", DIGITS, "checkpoint.dir={ck}", "--resume", _CORRUPT_JOB], {}, "is corrupt"),
    ("resume-changed-batch", ["run", DIGITS, "checkpoint.dir={ck}", "--resume", _CORRUPT_JOB, "batch_size=64"], {},
     "batch_size is 64"),
    ("resume-not-an-id", ["run", DIGITS, "checkpoint.dir={ck}", "--resume", "../../etc"], {}, "'../../etc'"),
    ("resume-no-checkpoints", ["run", DIGITS, "checkpoint.dir=null", "--resume", "last"], {}, "checkpoint.dir"),
    # elastic
    ("elastic-mpi", ["run", DIGITS, "--elastic", "-H", "localhost:1,127.0.0.1:1", "--mpi"], {}, "Gloo"),
    ("elastic-max-below-min", ["run", DIGITS, "--min-np", "2", "--max-np", "1", "-H", "localhost:1,127.0.0.1:1"], {},
     "--max-np 1"),
    ("elastic-script-missing", ["run", DIGITS, "--host-discovery-script", "{root}/no-discover.sh"], {}, "no-discover.sh"),
    ("elastic-script-noexec", ["run", DIGITS, "--host-discovery-script", "{discover_noexec}"], {}, "chmod +x"),
    ("elastic-flag-alone", ["run", DIGITS, "--reset-limit", "3"], {}, "without --elastic"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but lock files (taken and released: no data in them)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(case, tmp_path):
    from _server import free_port
    from conftest import worker_env

    name, argv, env_extra, needle = case
    files = {**_catalogue_files(tmp_path / "in"), "closed_port": str(free_port())}
    args = [a.format(**files) for a in argv]
    env = {k: v.format(**files) for k, v in env_extra.items()}
    store = tmp_path / "mlflow.db"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    before = _snapshot(tmp_path / "in")
    res = hvdkit(args, timeout=120, cwd=tmp_path, env=worker_env(**env))
    assert res.returncode == 2, (name, res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle.format(**files) in lines[0] and "fix:" in lines[0], (name, res.stderr)
    assert "hunter2" not in res.stdout + res.stderr  # a password in the input is never echoed
    # no worker started (a launch relays the ranks' output and names its log: launch/_console.py)
    assert "every rank's full output" not in res.stderr and "horovodrun" not in res.stdout
    assert not (tmp_path / "hvdkit-spool").exists(), name  # no spool begun
    assert _snapshot(tmp_path / "in") == before, name  # job folders, checkpoints, hostfiles untouched
    if store.exists():  # nothing was tracked, so nothing can be RUNNING
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        assert not runs, (name, [(r.info.run_name, r.info.status) for r in runs])


def test_catalogue_is_large():
    assert len(CATALOGUE) >= 30
