"""label_smoothing: the same training loss on both frameworks, and real jobs train with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import REPO, explain, hvdkit


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_both_frameworks_compute_the_same_smoothed_loss(eps):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from hvdkit.tensorflow._backend import training_loss

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, 64)
    ours_torch = torch.nn.CrossEntropyLoss(label_smoothing=eps)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    ours_tf = float(training_loss(eps)(labels, logits))
    assert ours_tf == pytest.approx(ours_torch, rel=1e-5)
    # by hand: (1 - eps) * CE(label) + eps * mean over classes of -log p_k
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = np.mean(-(1 - eps) * logp[np.arange(64), labels] - eps * logp.mean(1))
    assert ours_torch == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.horovod
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_digits_trains_with_label_smoothing(tmp_path, framework):
    res = hvdkit(["run", str(REPO / "recipes/digits.yaml"), "-np", "2", "--framework", framework, "--no-track",
                  "log.progress=false", "label_smoothing=0.1", "checkpoint.dir=null",
                  "--summary-json", str(tmp_path / "s.json")], cwd=tmp_path)
    assert res.returncode == 0, explain(res)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["val_metrics"]["val_accuracy"] >= 0.95
    # The smoothed target's own entropy is a floor the training loss cannot go under (~0.50 for
    # 10 classes at 0.1); unsmoothed, digits ends near 0.04. val_loss stays plain cross-entropy.
    floor = -(0.91 * math.log(0.91) + 9 * 0.01 * math.log(0.01))
    assert s["loss"] >= floor - 1e-3 and s["val_metrics"]["val_loss"] < floor
