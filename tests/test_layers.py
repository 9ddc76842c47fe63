"""The layer rules, checked: framework-free layers import with no framework present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

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


# -- the layer table as import-linter contracts (pyproject.toml [tool.importlinter]) -------------
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the hvdkit under `root` is the one analysed, not the installed checkout.
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)


def test_import_contracts_hold():
    res = _lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    # all three contracts were checked, none skipped
    assert res.stdout.count(" KEPT") == 3, res.stdout


@pytest.mark.parametrize("layer_module, added, contract", [
    # inside a function: a lazy import is still an import of the layer
    ("tracking/keys.py", "def _sneaky():\n    import torch\n", "framework-free layers never import torch"),
    ("core/lr.py", "def _sneaky():\n    import tensorflow\n", "framework-free layers never import torch"),
    ("recipe/_python.py", "import horovod.torch\n", "below the launcher nothing imports Horovod"),
    ("build/_cache.py", "def _sneaky():\n    from hvdkit.tracking import keys\n", "layers"),
])
def test_import_contract_fails_on_a_framework_import(tmp_path, layer_module, added, contract):
    """A copy of the package with one forbidden import added: lint-imports fails and names it."""
    shutil.copytree(REPO / "hvdkit", tmp_path / "hvdkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "hvdkit" / layer_module
    target.write_text(target.read_text() + "\n\n" + added)
    res = _lint_imports(tmp_path)
    assert res.returncode == 1, res.stdout[-3000:]
    module = "hvdkit." + layer_module.removesuffix(".py").replace("/", ".")
    broken = res.stdout[res.stdout.index("Broken contracts"):]
    assert contract in broken and module in broken, broken
