"""The TensorFlow layer's one averaging path (``GradientAveraging``), under a real 2-rank horovodrun.

Each rank computes its own gradient on its own batch (an Embedding, whose gradient is sparse, and
a Dense layer); the ranks' gradients are gathered and their mean compared with:

* what ``GradientAveraging`` returns when called directly (plain, with weight decay, with fp16);
* the update the custom loop's ``DistributedOptimizer.step`` makes (SGD, lr 1: θ1 = θ0 − (ḡ + λθ0));
* the update ``model.fit`` makes with ``DistributedKerasOptimizer`` (same formula);

and both optimizers are checked to have gone through the helper.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import explain, horovodrun, worker_env

pytest.importorskip("tensorflow")
pytest.importorskip("horovod.tensorflow")

pytestmark = pytest.mark.horovod

SCRIPT = r'''
import json, sys
import numpy as np
import keras, tensorflow as tf
import horovod.tensorflow as hvd
from hvdkit.tensorflow import _optimizer
from hvdkit.tensorflow._optimizer import DistributedOptimizer, GradientAveraging, dense_gradients
from hvdkit.tensorflow._keras import DistributedKerasOptimizer

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
hvd.init()
rank, size = hvd.rank(), hvd.size()
WD = 0.1

# Count the helper's collectives (the real ones run): both optimizers must come through here.
calls = {"n": 0}
_allreduce = GradientAveraging.allreduce
def counted(self, grads):
    calls["n"] += 1
    return _allreduce(self, grads)
GradientAveraging.allreduce = counted

keras.utils.set_random_seed(0)  # the same initial weights on every rank
model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(20, 4), keras.layers.Flatten(),
                          keras.layers.Dense(3)])
variables = model.trainable_variables
theta0 = [np.array(v.numpy()) for v in variables]
rng = np.random.default_rng(1000 + rank)  # a different batch on each rank
x = tf.constant(rng.integers(0, 20, (8, 5)).astype("int32"))
y = tf.constant(rng.integers(0, 3, 8).astype("int32"))
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

with tf.GradientTape() as tape:
    loss = loss_fn(y, model(x, training=True))
raw = tape.gradient(loss, variables)
local = [g.numpy() for g in dense_gradients(raw, variables)]
every = [hvd.allgather(tf.constant(g[None]), name=f"test.g{i}").numpy() for i, g in enumerate(local)]
mean = [e.mean(axis=0) for e in every]

out = {"sparse": isinstance(raw[0], tf.IndexedSlices),
       "ranks_differ": bool(any(not np.allclose(e[0], e[1]) for e in every)), "errors": {}}

def err(got, want):
    return max(float(np.max(np.abs(np.asarray(g) - w))) for g, w in zip(got, want))

# 1. the helper itself
out["errors"]["helper"] = err(GradientAveraging()(raw, variables), mean)
out["errors"]["helper_wd"] = err(GradientAveraging(weight_decay=WD)(raw, variables),
                                 [m + WD * t for m, t in zip(mean, theta0)])
out["errors"]["helper_fp16"] = err(GradientAveraging("fp16")(raw, variables), mean)
helper_calls = calls["n"]

# The update both optimizers must make: SGD, lr 1, no momentum, coupled decay after averaging.
want = [t - (m + WD * t) for t, m in zip(theta0, mean)]

# 2. the custom loop
loop = DistributedOptimizer(keras.optimizers.SGD(1.0), model, loss_fn, weight_decay=WD)
loop.build()
before = calls["n"]
loop.step(x, y)
out["loop_calls"] = calls["n"] - before
out["errors"]["loop"] = err([v.numpy() for v in variables], want)

# 3. model.fit
model.set_weights(theta0)
opt = DistributedKerasOptimizer(keras.optimizers.SGD(1.0), weight_decay=WD)
model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
before = calls["n"]
model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
out["fit_calls"] = calls["n"] - before  # traced once inside Keras' compiled train step
out["fit_iterations"] = int(opt.iterations.numpy())
out["errors"]["fit"] = err([v.numpy() for v in variables], want)
out["helper_calls"] = helper_calls
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
'''


def test_one_helper_averages_the_ranks_gradients_in_the_loop_and_in_fit(tmp_path):
    script, result = tmp_path / "averaging.py", tmp_path / "averaging.json"
    script.write_text(SCRIPT)
    proc = horovodrun([sys.executable, str(script), str(result)], np=2, cwd=tmp_path,
                      env=worker_env(TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, explain(proc)
    out = json.loads(result.read_text())
    assert out["sparse"], "the Embedding's gradient should be IndexedSlices (the sparse case)"
    assert out["ranks_differ"], "the ranks' gradients must differ, or a mean proves nothing"
    errors = out["errors"]
    assert errors["helper"] < 1e-6 and errors["helper_wd"] < 1e-6, errors
    assert errors["helper_fp16"] < 1e-3, errors  # half-precision transport
    assert errors["loop"] < 1e-6, errors
    assert errors["fit"] < 1e-6, errors
    assert out["helper_calls"] == 3
    assert out["loop_calls"] == 1
    assert out["fit_calls"] >= 1 and out["fit_iterations"] == 1
    assert np.isfinite(list(errors.values())).all()
