"""Gradient clipping by global norm (optimizer.clip_norm) happens after the allreduce: every rank
clips the same averaged gradient, so the data-parallel formula still holds (np=2 at batch b ==
np=1 at batch 2b), which clipping each rank's own gradient would break. Real jobs, every path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, explain, hvdkit
from test_recipes_run import PLAIN_SGD, _only_checkpoint, _weights

pytestmark = pytest.mark.horovod


@pytest.mark.parametrize("path", ["torch", "tensorflow", "keras_fit"])
def test_clipping_after_the_allreduce_keeps_np2_equal_to_np1(tmp_path, path):
    framework = "torch" if path == "torch" else "tensorflow"
    common = ["run", "recipes/digits.yaml", "--framework", framework, "--no-track", *PLAIN_SGD, "steps=3",
              f"keras_fit={'true' if path == 'keras_fit' else 'false'}"]
    clip = "optimizer.clip_norm=0.05"  # well under the digits MLP's gradient norm: it binds every step
    runs = {"np1": ["-np", "1", "batch_size=32", clip], "np2": ["-np", "2", "batch_size=16", clip],
            "unclipped": ["-np", "1", "batch_size=32"]}
    for name, args in runs.items():
        res = hvdkit([*common, *args, f"checkpoint.dir={tmp_path / name}", "--summary-json", str(tmp_path / f"{name}.json")],
                     cwd=REPO)
        assert res.returncode == 0, explain(res)
    # every rank clipped the same averaged gradient: the two ranks' parameters are equal bit for bit
    assert json.loads((tmp_path / "np2.json").read_text())["replicas_equal"] is True
    w = {name: _weights(_only_checkpoint(tmp_path / name)) for name in runs}
    for a, b in zip(w["np2"], w["np1"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(w["np1"], w["unclipped"]))  # clipping acted


def test_clipping_a_split_model_is_refused(tmp_path):
    res = hvdkit(["run", str(REPO / "recipes/digits.yaml"), "-np", "2", "parallel.model=2", "optimizer.clip_norm=1"], cwd=tmp_path,
                 timeout=120)
    assert res.returncode == 2, explain(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "optimizer.clip_norm=1.0" in lines[0] and "fix:" in lines[0], res.stderr
