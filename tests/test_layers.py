"""The layer rules, checked: framework-free layers import with no framework present."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class NoFrameworks(importlib.abc.MetaPathFinder):
        # behave as if torch, TensorFlow, Keras and Horovod were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "tensorflow", "keras", "horovod"}:
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, NoFrameworks())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_core_recipe_tracking_launch_import_without_frameworks():
    res = _run("""
        import hvdkit, hvdkit.core, hvdkit.recipe, hvdkit.tracking, hvdkit.launch, hvdkit.cli, hvdkit.build, hvdkit.torch, hvdkit.tensorflow
        from hvdkit.tracking import open_job_tracker, TrackingConfig
        from hvdkit.recipe import load_recipe
        r = load_recipe("recipes/digits.yaml").recipe
        print("ok", r.name)
    """)
    assert res.returncode == 0, res.stderr
    assert "ok digits" in res.stdout


def test_framework_layer_without_framework_names_the_install():
    res = _run("""
        from hvdkit.errors import FrameworkMissingError
        from hvdkit.recipe import load_recipe
        from hvdkit.core import load_builtin
        import hvdkit.torch
        l = load_recipe("recipes/digits.yaml")
        try:
            hvdkit.torch.make_backend(l.recipe, load_builtin(l.recipe.data, 0))
        except FrameworkMissingError as e:
            print("HINT", e)
    """)
    assert res.returncode == 0, res.stderr
    assert "HINT torch is not installed" in res.stdout and "pip install 'hvdkit[torch]'" in res.stdout


def test_mlflow_folder_never_shadows_mlflow():
    assert not (REPO / "mlflow" / "__init__.py").exists()
    res = subprocess.run([sys.executable, "-c", "import mlflow; print(mlflow.__file__)"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "site-packages" in res.stdout
