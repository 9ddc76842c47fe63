"""early_stopping: the metric stops improving, every rank stops after the same epoch, on the loop
(torch, TensorFlow) and on Keras fit; the last checkpoint is the stopping epoch's."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, explain, hvdkit
from hvdkit.core.early_stopping import EarlyStopping

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes


def test_patience_counts_evaluations_without_improvement():
    acc = EarlyStopping("val_accuracy", patience=2, min_delta=0.01)
    assert [acc.update({"val_accuracy": v}) for v in (0.5, 0.6, 0.605, 0.7, 0.7, 0.705)] == [False, False, False, False, False, True]
    loss = EarlyStopping("val_loss", patience=1)
    assert [loss.update({"val_loss": v}) for v in (1.0, 0.9, 0.95)] == [False, False, True]  # lower is better


@pytest.mark.horovod
@pytest.mark.parametrize("path", ["torch", "tensorflow", "keras_fit"])
def test_a_metric_that_stops_improving_stops_every_rank(tmp_path, path):
    framework = "torch" if path == "torch" else "tensorflow"
    # min_delta 0.5: accuracy can never improve that much after the first evaluation, so with
    # patience 2 the job stops after epoch 3 of 30.
    res = hvdkit(["run", str(REPO / "recipes/digits.yaml"), "-np", "2", "--framework", framework, "--no-track",
                  "log.progress=false", "epochs=30", f"keras_fit={'true' if path == 'keras_fit' else 'false'}",
                  "early_stopping.metric=val_accuracy", "early_stopping.patience=2", "early_stopping.min_delta=0.5",
                  f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every_epochs=10",
                  "--summary-json", str(tmp_path / "s.json")], cwd=tmp_path)
    assert res.returncode == 0, explain(res)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["epochs"] == 3 and s["stopped_early"] is True and s["steps"] == 3 * 22, s
    assert "stopped after epoch 3 of 30" in res.stdout + res.stderr
    assert [p.name for p in sorted((tmp_path / "ck").glob("*/ckpt-e*"))] == [f"ckpt-e0003.{'pt' if path == 'torch' else 'npz'}"]


@pytest.mark.parametrize("args, needle", [
    (["early_stopping.metric=val_f1"], "early_stopping.metric"),
    (["early_stopping.metric=val_loss", "eval.enabled=false"], "never logged"),
    (["early_stopping.metric=val_loss", "--elastic", "--min-np", "1", "--max-np", "2",
      "--host-discovery-script", "/bin/true"], "elastic"),
], ids=["unknown-metric", "no-evaluation", "elastic"])
def test_early_stopping_bad_input(tmp_path, args, needle):
    res = hvdkit(["run", str(REPO / "recipes/digits.yaml"), "-np", "2", *args], cwd=tmp_path, timeout=120)
    assert res.returncode == 2, explain(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "fix:" in lines[0], res.stderr
