"""``hvdkit.autolog()``: one line in plain Horovod scripts (PyTorch; TensorFlow/Keras 3 with
grouped_allreduce) gives the parent/child runs, under a real horovodrun and a real sqlite store."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mlflow import MlflowClient

from conftest import BIN, REPO, horovodrun, worker_env
from hvdkit.tracking import keys

try:
    from test_tracking_support import job_runs, sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import job_runs, sqlite_store

pytestmark = pytest.mark.horovod

LOG_EVERY = 5
STEPS = 23
GATHERS = [5, 10, 15, 20, 23]  # every 5 steps, plus the partial interval flushed at exit
NOISE = ("oneDNN", "absl::", "cpu_feature_guard", "To enable the following")

# A plain Horovod PyTorch training script. The only hvdkit line is the autolog() call.
TORCH_SCRIPT = """
import os
import torch
import horovod.torch as hvd
import hvdkit

hvd.init()
hvdkit.autolog({autolog_args})
torch.manual_seed(hvd.rank())
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size(), momentum=0.9)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
steps, fail_at = int(os.environ["STEPS"]), int(os.environ.get("FAIL_AT", "0"))
for step in range(1, steps + 1):
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if step == fail_at and hvd.rank() == 1:
        raise RuntimeError("injected failure on rank 1")
print("done", hvd.rank(), flush=True)
"""

# A plain Horovod TensorFlow / Keras 3 script: compiled gradient and apply steps, one eager
# grouped_allreduce per step between them (upstream's Keras 3 support is broken).
TF_SCRIPT = """
import os
import numpy as np
import tensorflow as tf
import keras
import horovod.tensorflow as hvd
import hvdkit

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
hvd.init()
hvdkit.autolog({autolog_args})
keras.utils.set_random_seed(hvd.rank())
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
opt = keras.optimizers.SGD(0.01 * hvd.size())
opt.build(model.trainable_variables)
hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.function
def gradients(x, y):
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return loss, tape.gradient(loss, model.trainable_variables)


@tf.function
def apply(grads):
    opt.apply(grads, model.trainable_variables)


for step in range(int(os.environ["STEPS"])):
    x = tf.constant(np.random.randn(32, 64).astype("float32"))
    y = tf.constant(np.random.randint(0, 10, 32))
    loss, grads = gradients(x, y)
    apply(hvd.grouped_allreduce(grads, op=hvd.Average))
# a metric average after training: not a step
print("final loss", float(hvd.allreduce(loss, op=hvd.Average, name="final_loss")), flush=True)
"""


def _tail(res, n=3000) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not any(s in ln for s in NOISE)]
    return "\n".join(lines)[-n:]


def _script(tmp_path, text: str, autolog_args: str, name: str = "train_script"):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(text).replace("{autolog_args}", autolog_args))
    return path


def _run(tmp_path, script, uri, **env):
    return horovodrun([sys.executable, str(script)], np=2, cwd=tmp_path,
                      env=worker_env(MLFLOW_TRACKING_URI=uri, STEPS=str(STEPS), **env))


def _layout(client):
    runs = job_runs(client)
    parents = [r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    children = sorted((r for r in runs if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_RANK),
                      key=lambda r: int(r.data.tags[keys.TAG_RANK]))
    return runs, parents, children


def _hist(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_autolog_gives_parent_and_children_with_step_and_comm_times(tmp_path, framework):
    uri = sqlite_store(tmp_path)
    text = TORCH_SCRIPT if framework == "torch" else TF_SCRIPT
    script = _script(tmp_path, text, f"batch_size=32, log_every={LOG_EVERY}")
    res = _run(tmp_path, script, uri)
    assert res.returncode == 0, _tail(res)
    client = MlflowClient(tracking_uri=uri)
    runs, parents, children = _layout(client)
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2, [r.info.run_name for r in runs]
    parent = parents[0]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert parent.info.run_name == "train_script-np2"
    assert parent.data.tags[keys.TAG_FRAMEWORK] == framework
    assert parent.data.tags[keys.TAG_RECIPE] == "train_script"
    assert parent.data.tags[keys.TAG_BATCH_SIZE] == "32"
    assert parent.data.tags["horovod.size"] == "2"  # the context provider's tags, on the job
    assert parent.data.params["batch_size"] == "32"

    measured = {keys.STEP_TIME_S, keys.COMM_WAIT_S, keys.RSS_MB, keys.SAMPLES_PER_SEC}
    sparse = {keys.PEAK_RSS_MB}  # a point when it moves by 1 MiB or more, not every gather
    if framework == "torch":
        measured.add(keys.DATA_TIME_S)  # from zero_grad(); TF has no such marker
    for r, child in enumerate(children):
        assert child.data.tags[keys.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert set(child.data.metrics) == measured | sparse, (r, sorted(child.data.metrics))  # no made-up loss
        assert GATHERS[0] in _hist(client, child.info.run_id, keys.PEAK_RSS_MB), r
        for key in measured:
            assert sorted(_hist(client, child.info.run_id, key)) == GATHERS, (r, key)  # the final allreduce is no step
        step_t = _hist(client, child.info.run_id, keys.STEP_TIME_S)
        comm_t = _hist(client, child.info.run_id, keys.COMM_WAIT_S)
        assert all(0 < comm_t[s] < step_t[s] for s in GATHERS), (step_t, comm_t)  # comm is part of the step
        sps = _hist(client, child.info.run_id, keys.SAMPLES_PER_SEC)
        data_t = _hist(client, child.info.run_id, keys.DATA_TIME_S) if framework == "torch" else {}
        for s in GATHERS:
            assert math.isclose(sps[s], 32 / (step_t[s] + data_t.get(s, 0.0)), rel_tol=1e-9)
    p_sps = _hist(client, parent.info.run_id, keys.SAMPLES_PER_SEC)
    for s in GATHERS:
        assert math.isclose(p_sps[s], sum(_hist(client, c.info.run_id, keys.SAMPLES_PER_SEC)[s] for c in children),
                            rel_tol=1e-12)
    assert keys.LOSS not in parent.data.metrics
    assert parent.data.metrics[keys.WORLD_SIZE] == 2


def test_autolog_without_batch_size_logs_no_throughput(tmp_path):
    uri = sqlite_store(tmp_path)
    script = _script(tmp_path, TORCH_SCRIPT, f"log_every={LOG_EVERY}")
    res = _run(tmp_path, script, uri)
    assert res.returncode == 0, _tail(res)
    runs, parents, children = _layout(MlflowClient(tracking_uri=uri))
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert set(child.data.metrics) == {keys.STEP_TIME_S, keys.DATA_TIME_S, keys.COMM_WAIT_S, keys.RSS_MB,
                                           keys.PEAK_RSS_MB}
    assert keys.SAMPLES_PER_SEC not in parents[0].data.metrics
    assert keys.SCALING_EFFICIENCY not in parents[0].data.metrics
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_autolog_runs_end_failed_when_a_rank_raises(tmp_path):
    uri = sqlite_store(tmp_path)
    script = _script(tmp_path, TORCH_SCRIPT, f"batch_size=32, log_every={LOG_EVERY}")
    res = _run(tmp_path, script, uri, FAIL_AT="12")
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr, _tail(res)
    runs, parents, children = _layout(MlflowClient(tracking_uri=uri))
    assert len(parents) == 1 and len(children) == 2
    # rank 1's exit hook ends nothing (rank 0 writes); rank 0 is waiting in the step's allreduce,
    # gets Horovod's shutdown error from rank 1's exit, and the script's exception ends the runs.
    assert {r.info.status for r in runs} == {"FAILED"}, [(r.info.run_name, r.info.status) for r in runs]
    assert sorted(_hist(MlflowClient(tracking_uri=uri), children[1].info.run_id, keys.STEP_TIME_S)) == [5, 10]


def test_autolog_runs_end_killed_on_interrupt(tmp_path):
    uri = sqlite_store(tmp_path)
    script = _script(tmp_path, TORCH_SCRIPT, "batch_size=32, log_every=20")
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--gloo", sys.executable, str(script)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(MLFLOW_TRACKING_URI=uri, STEPS="10000000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    client = MlflowClient(tracking_uri=uri)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs, parents, _ = _layout(client)
            if parents and keys.SAMPLES_PER_SEC in parents[0].data.metrics:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("no metrics logged: " + "".join(out[-30:]))
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on horovodrun: it SIGTERMs every rank
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    runs, parents, children = _layout(client)
    assert len(runs) == 3
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs] + out[-30:]


@pytest.mark.parametrize(
    "code, needle",
    [
        ("import hvdkit; hvdkit.autolog()", "found no Horovod framework module imported"),
        ("import horovod.torch, hvdkit; hvdkit.autolog()", "was called before horovod.torch.init()"),
        ("import horovod.torch as hvd, hvdkit; hvd.init(); hvdkit.autolog(batch_size=0)", "must be a positive int"),
    ],
)
def test_autolog_misuse_names_the_fix(tmp_path, code, needle):
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=worker_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'never.db'}"))
    assert res.returncode != 0
    assert needle in res.stderr and "fix:" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "never.db").exists()


def test_tracking_stays_framework_free():
    """autolog's entry module imports no framework, and neither does loading its adapter plugins
    (the framework layers' ``_autolog`` modules, found through the ``hvdkit.autolog`` entry points):
    a framework loads only when its adapter is built for a script that imported it."""
    code = ("import sys, hvdkit, hvdkit.tracking.autolog as a; plugins = a.adapter_plugins(); "
            "bad = [m for m in ('torch', 'tensorflow', 'horovod', 'keras') if m in sys.modules]; "
            "print(sorted(p.framework for p in plugins), bad); "
            "sys.exit(1 if bad or sorted(p.framework for p in plugins) != ['tensorflow', 'torch'] else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env=worker_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "not registered" not in res.stderr, res.stderr  # the entry points are installed (pip install -e .)
    for name in ("_autolog_torch.py", "_autolog_tf.py"):
        assert not (REPO / "hvdkit" / "tracking" / name).exists()  # the adapters live in the framework layers


def test_skip_keys_are_logged_nowhere(tmp_path, monkeypatch):
    """What autolog cannot measure (loss; samples_per_sec without a batch size) is not logged as 0."""
    from hvdkit.errors import UsageError
    from hvdkit.tracking import TrackingConfig

    try:
        from test_tracking_support import FakeWorld, finish_all, patient_config, start_all, step_all
    except ImportError:
        from tests.test_tracking_support import FakeWorld, finish_all, patient_config, start_all, step_all

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    config = patient_config(uri, tmp_path / "spool", log_every=5,
                            skip_keys=frozenset({keys.LOSS, keys.SAMPLES_PER_SEC}))
    trackers = FakeWorld(2).trackers(config)
    start_all(trackers, tags={keys.TAG_RECIPE: "x"})
    for step in range(1, 11):
        step_all(trackers, step)
    finish_all(trackers)
    client = MlflowClient(tracking_uri=uri)
    runs, parents, children = _layout(client)
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert set(child.data.metrics) == {keys.STEP_TIME_S, keys.DATA_TIME_S, keys.COMM_WAIT_S, keys.RSS_MB,
                                           keys.PEAK_RSS_MB}
    assert set(parents[0].data.metrics) == {keys.WORLD_SIZE, keys.STRAGGLER_RATIO}
    assert trackers[0].throughput() is None  # so no scaling efficiency either

    with pytest.raises(UsageError, match="not per-rank keys"):
        FakeWorld(1).trackers(TrackingConfig(tracking_uri=uri, skip_keys=frozenset({"val_loss"})))
