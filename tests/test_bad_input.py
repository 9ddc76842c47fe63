"""Bad input: one line naming the field and the fix, exit code 2, no worker started, nothing written."""

from __future__ import annotations

import pytest

from conftest import hvdkit


@pytest.mark.parametrize("args,needle", [
    (["run", "recipes/nope.yaml"], "recipes/nope.yaml not found"),
    (["run", "recipes/digits.yaml", "model.name=transformer"], "model.name"),
    (["run", "recipes/digits.yaml", "data.name=imagenet"], "data.name"),
    (["run", "recipes/digits.yaml", "optimizer.name=lion"], "optimizer.name"),
    (["run", "recipes/digits.yaml", "batch_size=0"], "batch_size"),
    (["run", "recipes/digits.yaml", "optimizer.lr=-1"], "optimizer.lr"),
    (["run", "recipes/digits.yaml", "optimizr.lr=0.1"], "unknown override key 'optimizr.lr'"),
    (["run", "recipes/digits.yaml", "epochs=many"], "epochs"),
    (["run", "recipes/digits.yaml", "lr"], "not key=value"),
    (["run", "recipes/digits.yaml", "-np", "3", "-H", "localhost:2"], "-np 3 is larger than the 2 slot"),
    (["run", "recipes/digits.yaml", "-np", "0"], "-np 0"),
])
def test_bad_run_input(args, needle):
    res = hvdkit(args, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "fix:" in lines[0], res.stderr
    assert "horovodrun" not in res.stdout  # no worker was started


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
    from hvdkit.build import BuildPlan, _env
    from hvdkit.build._horovod import resolve
    from hvdkit.errors import BuildError

    monkeypatch.setattr(_env, "framework_version", lambda fw: None)
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
    from hvdkit.build import _env
    from hvdkit.errors import LaunchError

    monkeypatch.setattr(_env, "installed_build", lambda: None)
    monkeypatch.setattr(_env, "probe_horovod", lambda fws: {fw: {"ok": False, "error": "ImportError: no mpi_lib"} for fw in fws})
    with pytest.raises(LaunchError) as exc:
        launch.check_framework_built("tensorflow")
    assert exc.value.exit_code == 2
    assert "Horovod is not built with tensorflow" in str(exc.value) and "hvdkit build-horovod --frameworks tensorflow" in str(exc.value)
