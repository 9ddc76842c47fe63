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


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("np_,model", [(2, 2), (4, 2)], ids=["np2-model2", "np4-2x2"])
def test_a_split_model_clips_by_the_unsplit_models_norm(tmp_path, framework, np_, model):
    """The tensor-parallel MLP clipped after averaging (hvdkit's split clipping: the slices' squared
    norms summed over the model group, whole parameters once) equals the unsplit model clipped in one
    process, after 3 SGD steps whose clipping binds (float64, rtol 1e-5): issue 13's equality
    workers with the clip added on both sides."""
    if framework == "torch":
        from test_parallel_torch import WORKER, check_equal_to_one_process, run_parallel_job

        worker = WORKER.replace(
            "opt.zero_grad(); torch.nn.functional.mse_loss(dense(x), y).backward(); opt.step()",
            "opt.zero_grad(); torch.nn.functional.mse_loss(dense(x), y).backward(); "
            "torch.nn.utils.clip_grad_norm_(dense.parameters(), CLIP); opt.step()").replace(
            "opt.zero_grad(); torch.nn.functional.mse_loss(tp(x[lo:lo + per]), y[lo:lo + per]).backward(); opt.step()",
            "opt.zero_grad(); torch.nn.functional.mse_loss(tp(x[lo:lo + per]), y[lo:lo + per]).backward(); "
            "opt.synchronize(); clip_grad_norm_(tp, CLIP, model_set)\n    with opt.skip_synchronize(): opt.step()").replace(
            "from hvdkit.torch._tensor_parallel import TensorParallelMLP,",
            "from hvdkit.torch._tensor_parallel import clip_grad_norm_, TensorParallelMLP,").replace(
            "IN, HIDDEN, OUT, BATCH, LR, STEPS = 6, [8, 6, 8, 5], 3, 8, 0.1, 3",
            "IN, HIDDEN, OUT, BATCH, LR, STEPS = 6, [8, 6, 8, 5], 3, 8, 0.1, 3\nCLIP = 0.05")
    else:
        from test_parallel_tf import WORKER, check_equal_to_one_process, run_parallel_job

        worker = _tf_clipped(WORKER)
    assert "CLIP" in worker and worker.count("clip") >= 3, "the worker's text changed: update the replacements"
    check_equal_to_one_process(run_parallel_job(worker, tmp_path, np_, model, "gloo"), np_, model)


def _tf_clipped(worker: str) -> str:
    """issue 13's TensorFlow equality worker, the reference clipped by tf.clip_by_global_norm and the
    split model's gradients averaged and clipped by hvdkit's GradientAveraging (the code path of the
    loop and of Keras fit)."""
    old = """    if average is not None:  # hybrid: average over the data-parallel set only
        grads = hvd.grouped_allreduce(grads, op=hvd.Average, process_set=average)"""
    new = """    if average is not None:  # hvdkit's averaging, then clipping by the unsplit model's norm
        grads = GradientAveraging(process_set=average, clip_norm=CLIP, model_set=model_set)(grads, net.trainable_variables)
    else:
        grads = tf.clip_by_global_norm(grads, CLIP)[0]"""
    assert old in worker
    return worker.replace(old, new).replace(
        "IN, HIDDEN, OUT, BATCH, LR, STEPS = 6, [8, 6, 8, 5], 3, 8, 0.1, 3",
        "IN, HIDDEN, OUT, BATCH, LR, STEPS = 6, [8, 6, 8, 5], 3, 8, 0.1, 3\nCLIP = 0.05").replace(
        "import horovod.tensorflow as hvd\n", "import horovod.tensorflow as hvd\nfrom hvdkit.tensorflow._optimizer import GradientAveraging\n")
