"""hvdkit.tensorflow in one process (Horovod at size 1): models, optimizer wrappers, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("horovod.tensorflow")

from hvdkit.core.data import digits  # noqa: E402
from hvdkit.recipe import Recipe  # noqa: E402


@pytest.mark.job
def test_import_is_lazy():
    code = ("import sys, hvdkit.tensorflow as t; "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules, callable(t.make_backend))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


@pytest.mark.parametrize("spec", [{"name": "mlp", "hidden": [32, 16]}, {"name": "cnn", "channels": 4},
                                  {"name": "resnet", "channels": 4, "blocks": 1}], ids=lambda s: s["name"])
def test_models_match_the_torch_architectures(spec):
    from hvdkit.tensorflow import _models

    model = _models.build(Recipe(name="m", model=spec).model, (8, 8, 1), 10)
    assert model(tf.zeros((2, 8, 8, 1))).shape == (2, 10)
    torch = pytest.importorskip("torch")  # noqa: F841
    from hvdkit.torch import _models as torch_models

    twin = torch_models.build(Recipe(name="m", model=spec).model, (1, 8, 8), 10)
    # Same parameter count, BatchNorm running statistics included (Keras counts them as weights).
    torch_count = sum(p.numel() for p in twin.parameters()) + sum(
        b.numel() for n, b in twin.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert model.count_params() == torch_count


def _backend(tmp_path=None, **kw):
    from hvdkit.tensorflow import make_backend

    recipe = Recipe(name="u", framework="tensorflow", model={"name": "mlp", "hidden": [16]}, batch_size=16,
                    optimizer={"name": "adam", "lr": 0.01}, **kw)
    data = digits(0.2, 0)
    return make_backend(recipe, data), data


def test_train_step_checkpoint_roundtrip(tmp_path):
    backend, data = _backend()
    assert (backend.rank, backend.size, backend.checkpoint_ext) == (0, 1, "npz")
    batch = backend.batch(np.arange(16))
    losses = [backend.train_step(batch, 0.01)[0] for _ in range(20)]
    assert losses[-1] < losses[0]
    metrics = backend.evaluate()
    assert set(metrics) == {"val_loss", "val_accuracy"}
    path = tmp_path / "ckpt-e0001.npz"
    backend.save_checkpoint(path, {"epoch": 0, "step": 20, "recipe": "u"})
    weights = backend.model.get_weights()
    opt = [v.numpy() for v in backend.keras_optimizer.variables]
    backend.train_step(batch, 0.01)
    meta = backend.load_checkpoint(path)
    assert meta == {"epoch": 0, "step": 20, "recipe": "u"}
    for a, b in zip(backend.model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for v, a in zip(backend.keras_optimizer.variables, opt):
        np.testing.assert_array_equal(v.numpy(), a)
    with np.load(path) as z:
        assert json.loads(str(z["meta"]))["step"] == 20
    assert backend.gather(np.array([1.0, 2.0])).shape == (1, 2)
    np.testing.assert_array_equal(backend.allreduce_sum(np.array([3.0])), [3.0])
    assert backend.broadcast_object({"a": 1}) == {"a": 1}


def test_micro_batches_equal_one_batch():
    """backward_passes_per_step=2 on a batch of 16 == one pass on it (loss/k per micro-batch)."""
    import keras

    from hvdkit.tensorflow._backend import sparse_ce
    from hvdkit.tensorflow._optimizer import DistributedOptimizer

    data = digits(0.2, 0)
    x, y = tf.constant(data.x_train[:16]), tf.constant(data.y_train[:16])
    results = []
    for passes in (1, 2):
        keras.utils.set_random_seed(1)
        from hvdkit.tensorflow._models import mlp

        model = mlp((8, 8, 1), 10, [8])
        opt = DistributedOptimizer(keras.optimizers.SGD(0.1), model, sparse_ce, backward_passes_per_step=passes)
        opt.build()
        loss, comm = opt.step(x, y, 0.1)
        results.append((loss, model.get_weights()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_keras_optimizer_accumulates_then_applies(compiled):
    import keras

    from hvdkit.tensorflow._keras import DistributedKerasOptimizer

    v = keras.Variable(np.zeros(3, np.float32))
    opt = DistributedKerasOptimizer(keras.optimizers.SGD(learning_rate=1.0), backward_passes_per_step=2)
    opt.build([v])
    apply = tf.function(lambda g: opt.apply_gradients([(g, v)])) if compiled else (lambda g: opt.apply_gradients([(g, v)]))
    apply(tf.constant([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(v.numpy(), [0, 0, 0])  # first micro-batch: only accumulated
    apply(tf.constant([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(v.numpy(), [-2, -2, -2])  # mean of the two, one SGD step
    assert int(opt.iterations) == 1
    apply(tf.constant([2.0, 2.0, 2.0]))
    apply(tf.constant([0.0, 0.0, 0.0]))
    np.testing.assert_allclose(v.numpy(), [-3, -3, -3])
    assert type(opt).__name__ == "DistributedSGD" and opt.get_config()["learning_rate"] == 1.0


def test_weight_decay_follows_torch():
    """sgd/adam: L2 added to the gradient (torch's coupled decay); adamw: Keras' decoupled decay."""
    from hvdkit.tensorflow._optimizer import keras_optimizer, l2_coefficient

    for name, l2 in (("sgd", 0.1), ("adam", 0.1), ("adamw", 0.0)):
        spec = Recipe(name="w", optimizer={"name": name, "weight_decay": 0.1}).optimizer
        assert l2_coefficient(spec) == l2
        assert keras_optimizer(spec).weight_decay == (0.1 if name == "adamw" else None)


def test_keras_fit_single_rank_learns():
    backend, data = _backend(keras_fit=True, epochs=3)
    summary = backend.fit()
    assert summary.epochs == 3 and summary.steps == 3 * (len(data.x_train) // 16)
    assert summary.val_metrics["val_accuracy"] > 0.85
