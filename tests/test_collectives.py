"""Issue 2's proof that the hvdkit-built Horovod works: real 2-rank jobs, Gloo and MPI, both frameworks."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from conftest import horovodrun

pytestmark = pytest.mark.horovod

TORCH = textwrap.dedent("""
    import json, sys, torch, horovod.torch as hvd
    hvd.init(); torch.set_num_threads(1)
    r, n = hvd.rank(), hvd.size()
    out = {"rank": r, "size": n}
    out["allreduce_sum"] = hvd.allreduce(torch.tensor([float(r + 1), 10.0 * r]), op=hvd.Sum).tolist()
    out["allreduce_avg"] = hvd.allreduce(torch.tensor([float(r + 1)]), op=hvd.Average).tolist()
    out["grouped"] = [t.tolist() for t in hvd.grouped_allreduce([torch.ones(3) * r, torch.arange(2.0) + r], op=hvd.Sum)]
    out["broadcast"] = hvd.broadcast(torch.tensor([float(r + 7)]), root_rank=1).tolist()
    torch.manual_seed(100 + r)                        # different init on each rank ...
    model = torch.nn.Linear(4, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)   # ... made equal by the broadcast
    x = torch.full((8, 4), float(r + 1)); y = torch.zeros(8, 2)    # different data on each rank
    opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
    out["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
    open(f"{sys.argv[1]}/rank{r}.json", "w").write(json.dumps(out))  # a file each: mpirun interleaves stdout
""")

TF = textwrap.dedent("""
    import json, sys, numpy as np, tensorflow as tf, keras, horovod.tensorflow as hvd
    hvd.init()
    r, n = hvd.rank(), hvd.size()
    out = {"rank": r, "size": n}
    out["allreduce_sum"] = hvd.allreduce(tf.constant([float(r + 1), 10.0 * r]), op=hvd.Sum).numpy().tolist()
    out["allreduce_avg"] = hvd.allreduce(tf.constant([float(r + 1)]), op=hvd.Average).numpy().tolist()
    out["grouped"] = [t.numpy().tolist() for t in hvd.grouped_allreduce([tf.ones(3) * r, tf.range(2.0) + r], op=hvd.Sum)]
    out["broadcast"] = hvd.broadcast(tf.constant([float(r + 7)]), root_rank=1).numpy().tolist()
    keras.utils.set_random_seed(100 + r)              # different init on each rank ...
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)  # ... made equal (Keras 3: the tf.Variable behind each)
    opt = keras.optimizers.SGD(0.1)
    x = tf.fill((8, 4), float(r + 1)); y = tf.zeros((8, 2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    grads = tape.gradient(loss, model.trainable_variables)
    grads = hvd.grouped_allreduce(grads, op=hvd.Average)         # Keras 3: hvdkit's path, not DistributedGradientTape
    opt.apply_gradients(zip(grads, model.trainable_variables))
    out["weights"] = [v.numpy().flatten().tolist() for v in model.trainable_variables]
    open(f"{sys.argv[1]}/rank{r}.json", "w").write(json.dumps(out))  # a file each: mpirun interleaves stdout
""")


def _results(proc, out_dir) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
@pytest.mark.parametrize("framework,script", [("torch", TORCH), ("tensorflow", TF)])
def test_collectives_and_one_step(tmp_path, framework, script, controller):
    path = tmp_path / f"collectives_{framework}.py"
    path.write_text(script)
    res = _results(horovodrun([sys.executable, str(path), str(tmp_path)], np=2, controller=controller), tmp_path)
    assert [r["rank"] for r in res] == [0, 1] and all(r["size"] == 2 for r in res)
    for r in res:
        assert r["allreduce_sum"] == [3.0, 10.0]
        assert r["allreduce_avg"] == [1.5]
        assert r["grouped"] == [[1.0, 1.0, 1.0], [1.0, 3.0]]
        assert r["broadcast"] == [8.0]  # rank 1's value
    # one averaged step from identical weights leaves the replicas identical, bit for bit
    assert res[0]["weights"] == res[1]["weights"]
