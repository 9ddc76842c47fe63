"""hvdkit.autolog finds its framework adapters as plugins (the ``hvdkit.autolog`` entry points).

Real processes and real package metadata: extra ``*.dist-info`` folders put first on
``PYTHONPATH`` declare a broken plugin, or play a stale hvdkit install without the group. A plain
PyTorch Horovod script (np=1) with ``hvdkit.autolog()`` must still track its runs, with one
warning line saying what was skipped or what to reinstall.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, sqlite_store, worker_env
from hvdkit.tracking import keys

pytest.importorskip("horovod.torch")

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

SCRIPT = """
import torch
import horovod.torch as hvd
import hvdkit

hvd.init()
session = hvdkit.autolog(batch_size=8, log_every=2)
print("ADAPTER", session.adapter.framework, session.adapter.accelerator, flush=True)
model = torch.nn.Linear(4, 2)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
for _ in range(4):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    opt.step()
"""


def _dist_info(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def _run(tmp_path: Path, site: Path, **extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "plain.py"
    script.write_text(SCRIPT)
    db = tmp_path / "mlflow.db"
    env = worker_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}" if db.exists() else sqlite_store(tmp_path), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=env)


def _finished_runs(tmp_path: Path) -> list:
    runs = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()])
    assert runs and {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    return runs


def test_the_adapters_are_registered_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="hvdkit.autolog")}
    assert eps == {"torch": "hvdkit.torch._autolog:adapter", "tensorflow": "hvdkit.tensorflow._autolog:adapter"}
    # The tracking layer imports no framework, not even inside a function: it loads plugins.
    tree = ast.parse((REPO / "hvdkit" / "tracking" / "autolog.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    framework = ("torch", "tensorflow", "keras", "horovod", "hvdkit.torch", "hvdkit.tensorflow")
    assert not [m for m in imported if m.split(".")[0] in framework[:4] or m.startswith(framework[4:])], imported


def test_a_broken_plugin_warns_and_is_skipped(tmp_path):
    site = tmp_path / "site"
    _dist_info(site, "brokenplugins", """
        [hvdkit.autolog]
        missing = hvdkit_no_such_module_xyz:adapter
        notafactory = json:__doc__
        raising = badadapter:adapter
    """)
    # First in line for horovod.torch scripts, but its construction fails: the next one serves.
    (site / "badadapter.py").write_text(textwrap.dedent("""
        class Bad:
            framework, horovod_module, priority = "torch", "horovod.torch", -1
            def __init__(self, hvd):
                raise RuntimeError("bad adapter")
        adapter = Bad
    """))
    res = _run(tmp_path, site)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "ADAPTER torch None" in res.stdout  # the CPU: no accelerator
    assert "skipping the 'missing' adapter plugin (hvdkit_no_such_module_xyz:adapter): ModuleNotFoundError" in res.stderr
    assert "skipping the 'notafactory' adapter plugin (json:__doc__): TypeError" in res.stderr
    assert "skipping the adapter 'Bad' for horovod.torch: RuntimeError: bad adapter" in res.stderr
    assert "not registered" not in res.stderr
    runs = _finished_runs(tmp_path)
    parent = next(r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT)
    assert parent.data.tags[keys.TAG_FRAMEWORK] == "torch"
    from hvdkit.tracking.efficiency import host_type

    assert parent.data.tags[keys.TAG_HOST_TYPE] == host_type(None)  # the adapter's accelerator: None here


def test_a_stale_install_falls_back_with_one_line_to_reinstall(tmp_path):
    site = tmp_path / "site"
    # hvdkit's metadata as an install made before the group existed: found first on sys.path.
    _dist_info(site, "hvdkit", """
        [console_scripts]
        hvdkit = hvdkit.cli:main
    """)
    res = _run(tmp_path, site, MLFLOW_EXPERIMENT_NAME="from-env")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "ADAPTER torch None" in res.stdout
    lines = [ln for ln in res.stderr.splitlines() if "not registered" in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "tensorflow, torch" in lines[0] and "'hvdkit.autolog'" in lines[0] and "pip install -e ." in lines[0]
    runs = _finished_runs(tmp_path)
    # autolog() without an experiment resolves it as `hvdkit run` does (hvdkit._ids.experiment_name)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {"from-env"}
