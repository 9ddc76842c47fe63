"""Issue 13's proof for TensorFlow / Keras 3: tensor-parallel layers on Horovod process sets equal one process.

The same proof as tests/test_parallel_torch.py: np=2 with model 2 and np=4 with model 2 (2x2
hybrid, gradients averaged over the data-parallel set only, each copy on its half of the batch)
against the unsplit model in one process with plain Keras Dense layers, float64, forward outputs
and parameters after 3 SGD steps, relative tolerance 1e-5. Gradients are computed in a
tf.function, as hvdkit's TF backend does; the forward is checked eager and compiled.
"""

from __future__ import annotations

import textwrap

import pytest

from test_parallel_torch import check_equal_to_one_process, close, run_parallel_job

pytestmark = pytest.mark.horovod

WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import keras
    import horovod.tensorflow as hvd
    from hvdkit.core._layout import ParallelLayout
    from hvdkit.tensorflow._tensor_parallel import TensorParallelMLP, broadcast_variables, make_process_sets

    out_dir, model = sys.argv[1], int(sys.argv[2])
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.config.set_floatx("float64")
    size = int(os.environ.get("HOROVOD_SIZE") or os.environ["OMPI_COMM_WORLD_SIZE"])  # before hvd.init: static sets
    layout = ParallelLayout(size, model)
    model_set, data_set = make_process_sets(layout)      # calls hvd.init(process_sets=...)
    r = hvd.rank()
    IN, HIDDEN, OUT, BATCH, LR, STEPS = 6, [8, 6, 8, 5], 3, 8, 0.1, 3

    def mse(pred, y):
        return tf.reduce_mean(tf.square(pred - y))

    @tf.function(reduce_retracing=True)  # compiled, as hvdkit's TF backend computes gradients
    def compute(net, x, y):
        with tf.GradientTape() as tape:
            loss = mse(net(x), y)
        return tape.gradient(loss, net.trainable_variables)

    def sgd_step(net, opt, x, y, average=None):
        grads = compute(net, x, y)
        if average is not None:  # hybrid: average over the data-parallel set only
            grads = hvd.grouped_allreduce(grads, op=hvd.Average, process_set=average)
        opt.apply_gradients(zip(grads, net.trainable_variables))

    # The unsplit model, one process, no Horovod: in -> 8 -> 6 -> 8 -> 5 -> 3.
    keras.utils.set_random_seed(0)
    widths = [IN, *HIDDEN, OUT]
    dense = keras.Sequential([keras.Input((IN,))] + [keras.layers.Dense(w, activation="relu" if j < len(HIDDEN) else None)
                                                     for j, w in enumerate(widths[1:])])
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((BATCH, IN)))
    y = tf.constant(rng.standard_normal((BATCH, OUT)))
    start = {}
    for i, layer in enumerate(dense.layers):
        start[f"{i}.kernel"], start[f"{i}.bias"] = layer.kernel.numpy(), layer.bias.numpy()
    ref_out = dense(x).numpy()
    opt = keras.optimizers.SGD(LR)
    for _ in range(STEPS):
        sgd_step(dense, opt, x, y)
    ref_end = {f"{i}.{w}": getattr(layer, w).numpy() for i, layer in enumerate(dense.layers) for w in ("kernel", "bias")}

    # The split model. Different seeds per rank first: broadcast_variables must make it one model.
    keras.utils.set_random_seed(100 + r)
    tp = TensorParallelMLP(IN, HIDDEN, OUT, model_set)
    broadcast_variables(tp, data_set)
    after_bcast = tp.full_weights()
    tp.load_full_weights(start)
    out = tp(x).numpy()                      # eager
    out_fn = tf.function(tp)(x).numpy()      # and compiled
    per = BATCH // layout.data
    lo = layout.data_rank(r) * per
    opt = keras.optimizers.SGD(LR)
    for _ in range(STEPS):
        sgd_step(tp, opt, x[lo:lo + per], y[lo:lo + per], average=data_set)
    end = tp.full_weights()
    local = sum(int(np.prod(v.shape)) for v in tp.trainable_variables)

    dump = lambda d: {k: np.asarray(v).tolist() for k, v in d.items()}
    json.dump({"rank": r, "model_set": model_set.ranks, "data_set": data_set.ranks, "local_params": local,
               "full_params": sum(v.size for v in start.values()),
               "ref_out": ref_out.tolist(), "out": out.tolist(), "out_fn": out_fn.tolist(), "ref_end": dump(ref_end), "end": dump(end),
               "after_bcast": dump(after_bcast)},
              open(f"{out_dir}/rank{r}.json", "w"))
    # One model group can finish before the other; the first rank to exit shuts Horovod down for all.
    hvd.allreduce(tf.constant(0.0), name="tp.test.done")
""")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
@pytest.mark.parametrize("np_,model", [(2, 2), (4, 2)], ids=["np2-model2", "np4-2x2"])
def test_tensor_parallel_mlp_equals_one_process(tmp_path, np_, model, controller):
    res = run_parallel_job(WORKER, tmp_path, np_, model, controller)
    check_equal_to_one_process(res, np_, model)
    for r in res:
        close(r["out_fn"], r["ref_out"])
