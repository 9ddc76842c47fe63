"""hvdkit.tensorflow under real Horovod: 2-rank Gloo jobs started by horovodrun, no mocks.

Each test writes a small training script, runs it with ``horovodrun -np 2 --gloo`` (or plainly at
np=1) and reads back what rank 0 wrote: the Summary, whether the ranks' weights are identical,
what the tracker saw. Checkpoints (npz) give the weights compared across runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.job  # tests/_suite.py: starts processes

pytest.importorskip("tensorflow")
pytest.importorskip("horovod.tensorflow")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOROVODRUN = BIN / "horovodrun"

SCRIPT = r'''
import json, sys, time
import numpy as np
from hvdkit.recipe import Recipe
from hvdkit.core import run_training
from hvdkit.core.data import digits
from hvdkit.core.job import JobFolder
from hvdkit.tensorflow import make_backend

cfg = json.loads(sys.argv[1])

class Tracker:
    def __init__(self):
        self.steps, self.comm = [], 0.0
    def record_step(self, step, *, samples, step_time_s, data_time_s, comm_wait_s, loss):
        self.steps.append(step); self.comm += comm_wait_s
    def log_metrics(self, metrics, step): pass
    def log_artifact(self, path, artifact_path=None): pass

recipe = Recipe(name="t", framework="tensorflow", **cfg["recipe"])
data = digits(0.2, recipe.seed)
backend = make_backend(recipe, data)
tracker = Tracker()
t0 = time.perf_counter()
# A job folder given directly (library use); only an explicit resume continues from its checkpoints.
job = JobFolder.at(recipe.checkpoint.dir, resumed=cfg.get("resume", False))
summary = backend.fit(recipe, tracker, job=job) if recipe.keras_fit else run_training(backend, recipe, data, tracker, job=job)
wall = time.perf_counter() - t0
# Per-variable float64 sums and sums of squares, gathered: rows must be bitwise equal across ranks.
w = backend.model.get_weights()
vec = np.array([f(a.astype(np.float64)) for a in w for f in (np.sum, lambda a: np.sum(a * a))])
rows = backend.gather(vec)
if backend.rank == 0:
    out = {"summary": {k: v for k, v in vars(summary).items()}, "size": backend.size,
           "identical": bool((rows == rows[0]).all()), "gathered_shape": list(rows.shape),
           "first_step": tracker.steps[0] if tracker.steps else None, "num_steps": len(tracker.steps),
           "comm_wait_s": tracker.comm, "wall_s": wall}
    with open(cfg["out"], "w") as f:
        json.dump(out, f)
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_job(tmp_path: Path, recipe: dict, np_: int = 2, tag: str = "run", resume: bool = False) -> dict:
    script = tmp_path / "train_tf.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{tag}.json"
    cfg = json.dumps({"recipe": recipe, "out": str(out), "resume": resume})
    if np_ == 1:
        cmd = [sys.executable, str(script), cfg]
    else:
        cmd = [str(HOROVODRUN), "-np", str(np_), "--gloo", sys.executable, str(script), cfg]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd[:5])} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    assert result["size"] == np_
    assert result["gathered_shape"][0] == np_
    return result


def model_weights(path: str | Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[k] for k in sorted(k for k in z.files if k.startswith("model/"))]


def _formula_recipe(batch_size: int, ckpt: Path, **extra) -> dict:
    return dict(model={"name": "mlp", "hidden": [64]}, batch_size=batch_size, steps=5,
                optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0}, lr_schedule={"scale": "none"},
                eval={"enabled": False}, checkpoint={"dir": str(ckpt)}, **extra)


@pytest.fixture(scope="module")
def np1_reference(tmp_path_factory) -> list[np.ndarray]:
    """5 plain-SGD steps at np=1 with batch 32: the weights the 2-rank runs must reproduce."""
    tmp = tmp_path_factory.mktemp("np1")
    res = run_job(tmp, _formula_recipe(32, tmp / "ckpt"), np_=1, tag="np1")
    assert res["summary"]["steps"] == 5
    return model_weights(res["summary"]["checkpoint"])


@pytest.mark.job
def test_averaged_gradient_formula_matches_np1(tmp_path, np1_reference):
    """g = (1/p) Σ g_i: np=2 × batch 16 gives the weights of np=1 × batch 32 on the same samples."""
    res = run_job(tmp_path, _formula_recipe(16, tmp_path / "ckpt"))
    assert res["summary"]["steps"] == 5 and res["identical"]
    assert res["comm_wait_s"] > 0  # the allreduce was timed
    got = model_weights(res["summary"]["checkpoint"])
    assert len(got) == len(np1_reference)
    for a, b in zip(got, np1_reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_keras_fit_formula_with_backward_passes(tmp_path, np1_reference):
    """model.fit at np=2, batch 16 as 2 micro-batches of 8 (backward_passes_per_step=2): same weights again."""
    res = run_job(tmp_path, _formula_recipe(16, tmp_path / "ckpt", keras_fit=True,
                                            horovod={"backward_passes_per_step": 2}))
    assert res["summary"]["steps"] == 5 and res["num_steps"] == 5 and res["identical"]
    for a, b in zip(model_weights(res["summary"]["checkpoint"]), np1_reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


DIGITS = dict(model={"name": "mlp", "hidden": [256, 128]}, batch_size=32, epochs=5,
              optimizer={"name": "adam", "lr": 0.001})


@pytest.mark.parametrize("keras_fit", [False, True], ids=["loop", "fit"])
def test_digits_learns_at_np2_with_identical_weights(tmp_path, keras_fit):
    res = run_job(tmp_path, dict(DIGITS, keras_fit=keras_fit))
    s = res["summary"]
    print(f"np=2 {'fit' if keras_fit else 'loop'}: val_accuracy={s['val_metrics']['val_accuracy']:.4f} "
          f"samples/s={s['samples_per_sec']:.0f}")
    assert s["val_metrics"]["val_accuracy"] >= 0.95
    assert res["identical"]
    assert s["epochs"] == 5 and s["steps"] == res["num_steps"] > 0
    assert s["samples_per_sec"] > 0


def test_fp16_compression_and_backward_passes_learn(tmp_path):
    res = run_job(tmp_path, dict(DIGITS, horovod={"compression": "fp16", "backward_passes_per_step": 2}))
    assert res["summary"]["val_metrics"]["val_accuracy"] >= 0.93
    assert res["identical"]


@pytest.mark.parametrize("keras_fit", [False, True], ids=["loop", "fit"])
def test_resume_continues_from_the_last_checkpoint(tmp_path, keras_fit):
    ckpt = tmp_path / "ckpt"
    base = dict(model={"name": "mlp", "hidden": [64]}, batch_size=64, optimizer={"name": "adam", "lr": 0.002},
                checkpoint={"dir": str(ckpt)}, keras_fit=keras_fit)
    first = run_job(tmp_path, dict(base, epochs=2), tag="first")
    steps_per_epoch = first["summary"]["steps"] // 2
    assert first["summary"]["resumed_from"] is None and first["first_step"] == 1
    assert sorted(p.name for p in ckpt.glob("ckpt-*")) == ["ckpt-e0001.npz", "ckpt-e0002.npz"]
    with np.load(ckpt / "ckpt-e0002.npz") as z:
        assert json.loads(str(z["meta"])) == {"epoch": 1, "step": 2 * steps_per_epoch, "recipe": "t"}

    second = run_job(tmp_path, dict(base, epochs=4), tag="second", resume=True)
    s = second["summary"]
    assert s["resumed_from"].endswith("ckpt-e0002.npz")
    assert second["first_step"] == 2 * steps_per_epoch + 1  # starts at epoch 3
    assert second["num_steps"] == 2 * steps_per_epoch
    assert s["epochs"] == 4 and s["steps"] == 4 * steps_per_epoch
    assert s["checkpoint"].endswith("ckpt-e0004.npz")
    assert second["identical"]
    assert s["val_metrics"]["val_accuracy"] > first["summary"]["val_metrics"]["val_accuracy"] - 0.02


PLAIN_FIT = r'''
import json, sys
import numpy as np
import keras, tensorflow as tf
import horovod.tensorflow as hvd
import hvdkit.tensorflow as hk
from hvdkit.core.data import digits

hvd.init()
keras.utils.set_random_seed(100 + hvd.rank())  # different initial weights on each rank
data = digits(0.2, 0)
x, y = data.x_train[hvd.rank()::hvd.size()], data.y_train[hvd.rank()::hvd.size()]
model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(10)])
opt = hk.DistributedKerasOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), compression="fp16")
model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"], jit_compile=False)
steps = len(x) // 32
hist = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[
    hk.BroadcastGlobalVariablesCallback(0), hk.MetricAverageCallback(),
    hk.LearningRateWarmupCallback(0.05, warmup_epochs=1, steps_per_epoch=steps + (len(x) % 32 > 0))])
w = np.concatenate([a.ravel() for a in model.get_weights()]).astype(np.float64)
rows = hvd.allgather(tf.constant(np.array([[w.sum(), (w * w).sum(), hist.history["loss"][-1]]]))).numpy()
if hvd.rank() == 0:
    json.dump({"rows": rows.tolist(), "lr": float(opt.learning_rate.numpy()), "loss": hist.history["loss"],
               "accuracy": hist.history["accuracy"][-1], "iterations": int(opt.iterations.numpy())},
              open(sys.argv[1], "w"))
'''


def test_public_keras_pieces_in_a_plain_fit(tmp_path):
    """A user's own model.fit with DistributedKerasOptimizer + the three callbacks."""
    script, out = tmp_path / "plain_fit.py", tmp_path / "plain.json"
    script.write_text(PLAIN_FIT)
    cmd = [str(HOROVODRUN), "-np", "2", "--gloo", sys.executable, str(script), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    rows = np.array(res["rows"])
    assert (rows == rows[0]).all()  # broadcast start + averaged steps: same weights; averaged logs
    assert res["lr"] == pytest.approx(0.1)  # warmed up to base × size
    assert res["loss"][-1] < res["loss"][0] and res["accuracy"] > 0.9
    assert res["iterations"] == 3 * 23  # ceil(719 / 32) steps per epoch on each rank
