"""Issue 13 on the TensorFlow training path: recipes with ``parallel.model`` > 1 train for real.

Real horovodrun jobs (hvdkit's shim, Gloo) of hvdkit's own loop and of the ``keras_fit`` path with
a split built-in MLP: the 2x2 hybrid (np=4, model 2) learns digits, np=2 with model 2 runs, every
rank ends with the same unsplit model, and a split job's checkpoint (one file: the unsplit mlp and
optimizer state) resumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, explain, hvdkit, worker_env

pytest.importorskip("tensorflow")
pytest.importorskip("horovod.tensorflow")
pytestmark = pytest.mark.horovod

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
t0 = time.perf_counter()
backend = make_backend(recipe, data)
tracker = Tracker()
job = JobFolder.at(recipe.checkpoint.dir, resumed=cfg.get("resume", False))
summary = backend.fit(recipe, tracker, job=job) if recipe.keras_fit else run_training(backend, recipe, data, tracker, job=job)
wall = time.perf_counter() - t0
# a collective of the model group: the unsplit model (a plain job: its weights)
full = backend.model.full_weights() if backend.split else {f"{i:04d}": w for i, w in enumerate(backend.model.get_weights())}
vec = np.array([f(np.asarray(full[k], np.float64)) for k in sorted(full) for f in (np.sum, lambda a: np.sum(a * a))])
rows = backend.gather(vec)
sets = (backend.data_set.size(), backend.model_set.size()) if backend.split else (backend.size, 1)
info = backend.gather(np.array([backend.parameters_local(), backend.layer_comm_s, *sets], dtype=np.float64))
if backend.rank == 0:
    out = {"summary": dict(vars(summary)), "size": backend.size, "identical": bool((rows == rows[0]).all()),
           "params_local": info[:, 0].tolist(), "layer_comm_s": info[:, 1].tolist(), "data_set": info[:, 2].tolist(),
           "model_set": info[:, 3].tolist(), "full_params": int(sum(np.asarray(v).size for v in full.values())),
           "first_step": tracker.steps[0] if tracker.steps else None, "num_steps": len(tracker.steps),
           "comm_wait_s": tracker.comm, "wall_s": wall}
    with open(cfg["out"], "w") as f:
        json.dump(out, f)
'''

DIGITS = dict(model={"name": "mlp", "hidden": [256, 128]}, data={"name": "digits"}, batch_size=32, epochs=5,
              optimizer={"name": "adam", "lr": 0.001}, log={"progress": False})


def run_job(tmp_path: Path, recipe: dict, np_: int, tag: str = "run", resume: bool = False) -> dict:
    script = tmp_path / "train_tp.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{tag}.json"
    cfg = json.dumps({"recipe": recipe, "out": str(out), "resume": resume})
    cmd = [sys.executable, "-m", "hvdkit._horovodrun", "-np", str(np_), "--gloo", sys.executable, str(script), cfg]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=worker_env())
    assert proc.returncode == 0, explain(proc)
    res = json.loads(out.read_text())
    assert res["size"] == np_
    return res


def plain_mlp_accuracy(ckpt: Path, hidden: list[int]) -> float:
    """The split job's checkpoint loads into hvdkit's plain (unsplit) Keras mlp, in this process."""
    code = f'''
import json, numpy as np, keras
from hvdkit.core.data import digits
from hvdkit.recipe._model import ModelSpec
from hvdkit.tensorflow._models import build
data = digits(0.2, 42)
model = build(ModelSpec(name="mlp", hidden={hidden!r}), data.input_shape, data.num_classes)
with np.load({str(ckpt)!r}) as z:
    model.set_weights([z[k] for k in sorted(k for k in z.files if k.startswith("model/"))])
print(json.dumps(float(np.mean(np.argmax(model.predict(data.x_val, verbose=0), 1) == data.y_val))))
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=worker_env())
    assert proc.returncode == 0, explain(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("keras_fit", [False, True], ids=["loop", "fit"])
def test_digits_learns_in_the_2x2_hybrid(tmp_path, keras_fit):
    res = run_job(tmp_path, dict(DIGITS, parallel={"model": 2}, keras_fit=keras_fit, checkpoint={"dir": str(tmp_path / "ckpt")}), 4)
    s = res["summary"]
    print(f"2x2 {'fit' if keras_fit else 'loop'}: val_accuracy={s['val_metrics']['val_accuracy']:.4f} "
          f"steps={s['steps']} wall={res['wall_s']:.1f}s layer_comm_s={res['layer_comm_s']}")
    assert s["val_metrics"]["val_accuracy"] >= 0.95
    assert res["identical"]  # every rank: the same unsplit model
    assert res["data_set"] == [2, 2, 2, 2] and res["model_set"] == [2, 2, 2, 2]
    assert all(p < res["full_params"] for p in res["params_local"])  # each member holds less
    assert all(t > 0 for t in res["layer_comm_s"])
    # The checkpoint is the unsplit model: hvdkit's plain mlp loads it and scores the same.
    acc = plain_mlp_accuracy(Path(s["checkpoint"]), DIGITS["model"]["hidden"])
    assert abs(acc - s["val_metrics"]["val_accuracy"]) < 1e-6


def test_np2_model2_runs(tmp_path):
    res = run_job(tmp_path, dict(DIGITS, epochs=2, parallel={"model": 2}), 2)
    s = res["summary"]
    assert res["identical"] and res["data_set"] == [1, 1] and res["model_set"] == [2, 2]
    assert s["epochs"] == 2 and s["steps"] == res["num_steps"] > 0
    assert s["val_metrics"]["val_accuracy"] > 0.8
    assert res["comm_wait_s"] < 0.05  # one model copy: no gradient allreduce at all


@pytest.mark.parametrize("keras_fit", [False, True], ids=["loop", "fit"])
def test_resume_of_a_split_job(tmp_path, keras_fit):
    ckpt = tmp_path / "ckpt"
    base = dict(DIGITS, model={"name": "mlp", "hidden": [64]}, batch_size=64, parallel={"model": 2},
                checkpoint={"dir": str(ckpt)}, keras_fit=keras_fit)
    first = run_job(tmp_path, dict(base, epochs=2), 2, tag="first")
    per_epoch = first["summary"]["steps"] // 2
    assert sorted(p.name for p in ckpt.glob("ckpt-*")) == ["ckpt-e0001.npz", "ckpt-e0002.npz"]
    with np.load(ckpt / "ckpt-e0002.npz") as z:
        assert json.loads(str(z["meta"]))["parallel_model"] == 2
        shapes = [z[k].shape for k in sorted(k for k in z.files if k.startswith("model/"))]
    assert shapes == [(64, 64), (64,), (64, 10), (10,)]  # the unsplit mlp

    second = run_job(tmp_path, dict(base, epochs=4), 2, tag="second", resume=True)
    s = second["summary"]
    assert s["resumed_from"].endswith("ckpt-e0002.npz")
    assert second["first_step"] == 2 * per_epoch + 1 and second["num_steps"] == 2 * per_epoch
    assert s["epochs"] == 4 and s["steps"] == 4 * per_epoch and second["identical"]
    assert s["val_metrics"]["val_accuracy"] > first["summary"]["val_metrics"]["val_accuracy"] - 0.02


def test_hvdkit_run_2x2_keras_fit_tracked(tmp_path, sqlite_uri):
    """`hvdkit run` end to end (pre-launch checks, hvdkit.train, MLflow): the 2x2 hybrid with model.fit."""
    from mlflow import MlflowClient

    from conftest import hvdkit

    res = hvdkit(["run", "recipes/digits.yaml", "-np", "4", "--framework", "tensorflow", "parallel.model=2", "keras_fit=true",
                  "epochs=5", "log.progress=false", f"checkpoint.dir={tmp_path / 'ck'}"], env=worker_env(MLFLOW_TRACKING_URI=sqlite_uri))
    assert res.returncode == 0, explain(res)
    client = MlflowClient(tracking_uri=sqlite_uri)
    parents = [r for r in client.search_runs([client.get_experiment_by_name("hvdkit").experiment_id])
               if "hvdkit.parent_run_id" not in r.data.tags and r.data.tags.get("hvdkit.role") != "rank"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    print(f"hvdkit run 2x2 keras_fit: val_accuracy={parents[0].data.metrics['val_accuracy']:.4f}")
    assert parents[0].data.metrics["val_accuracy"] >= 0.95


def test_split_checkpoint_resumes_unsplit_and_back(tmp_path):
    """The checkpoint is the unsplit model and optimizer: a plain data-parallel job (parallel.model 1)
    resumes a split job's checkpoint, and a split job resumes the plain one's."""
    ckpt = tmp_path / "ckpt"
    base = dict(DIGITS, model={"name": "mlp", "hidden": [64]}, batch_size=64, checkpoint={"dir": str(ckpt)})
    first = run_job(tmp_path, dict(base, epochs=1, parallel={"model": 2}), 2, tag="split")
    done = first["summary"]["steps"]  # (a step count: one model copy here, two in the plain job)
    plain = run_job(tmp_path, dict(base, epochs=3), 2, tag="plain", resume=True)
    assert plain["summary"]["resumed_from"].endswith("ckpt-e0001.npz") and plain["first_step"] == done + 1
    assert plain["num_steps"] > 0 and plain["identical"]
    again = run_job(tmp_path, dict(base, epochs=4, parallel={"model": 2}), 2, tag="again", resume=True)
    assert again["summary"]["resumed_from"] == plain["summary"]["checkpoint"]
    assert again["first_step"] == plain["summary"]["steps"] + 1 and again["num_steps"] > 0 and again["identical"]
    assert again["summary"]["val_metrics"]["val_accuracy"] > first["summary"]["val_metrics"]["val_accuracy"] - 0.02


SPLIT_RECIPE = r'''
from hvdkit.recipe import PythonRecipe


class SplitKeras(PythonRecipe):
    config = {"name": "split-keras", "model": {"name": "custom"}, "data": {"name": "digits"}, "batch_size": 32,
              "epochs": 6, "optimizer": {"name": "adam", "lr": 0.002}, "log": {"progress": False}, "threads": 1}

    def build_model(self, framework, input_shape, num_classes, parallel=None):
        import keras

        width = 1
        for d in input_shape:
            width *= d

        class Net(keras.Model):
            def __init__(self):
                super().__init__(name="net")
                self.flat = keras.layers.Flatten()
                if parallel is None:
                    self.col = keras.layers.Dense(128, activation="relu", name="col")
                    self.row = keras.layers.Dense(num_classes, name="row")
                else:
                    from hvdkit.tensorflow._tensor_parallel import ColumnParallelDense, RowParallelDense

                    self.col = ColumnParallelDense(width, 128, parallel.model_set, gather_output=False, activation="relu", name="col")
                    self.row = RowParallelDense(128, num_classes, parallel.model_set, input_is_split=True, name="row")

            def call(self, x):
                return self.row(self.col(self.flat(x)))

        return Net()
'''

def test_python_recipe_splits_its_own_model(tmp_path):
    """A Keras build_model(..., parallel=ctx) of a column then a row layer: `hvdkit run -np 2
    parallel.model=2` learns digits, and its checkpoint (the unsplit model and Adam's moments) loads
    into build_model(parallel=None) with the same accuracy."""
    recipe = tmp_path / "split_keras.py"
    recipe.write_text(SPLIT_RECIPE)
    res = hvdkit(["run", str(recipe), "-np", "2", "--framework", "tensorflow", "--no-track", "parallel.model=2",
                  f"checkpoint.dir={tmp_path / 'ck'}", "--summary-json", str(tmp_path / "s.json")], cwd=tmp_path)
    assert res.returncode == 0, explain(res)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["val_metrics"]["val_accuracy"] >= 0.9
    ckpt = sorted((tmp_path / "ck").rglob("ckpt-e*"))[-1]  # the last epoch's
    code = f'''
import json, numpy as np
from hvdkit.core.data import digits
from hvdkit.recipe import load_recipe
data = digits(0.2, 42)
model = load_recipe({str(recipe)!r}).python.build_model("tensorflow", data.input_shape, data.num_classes)
model(data.x_val[:1])
with np.load({str(ckpt)!r}) as z:
    model.set_weights([z[k] for k in sorted(k for k in z.files if k.startswith("model/"))])
    opt = [z[k].shape for k in sorted(k for k in z.files if k.startswith("optimizer/"))]
shapes = [tuple(w.shape) for w in model.get_weights()]
print(json.dumps({{"acc": float(np.mean(np.argmax(model.predict(data.x_val, verbose=0), 1) == data.y_val)),
                  "shapes": shapes, "opt": [list(o) for o in opt]}}))
'''
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=worker_env())
    assert proc.returncode == 0, explain(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [tuple(x) for x in got["shapes"]] == [(64, 128), (128,), (128, 10), (10,)]  # the unsplit model
    assert abs(got["acc"] - s["val_metrics"]["val_accuracy"]) < 1e-6
    # Adam's moments saved unsplit: each variable's shape appears among the optimizer arrays
    for shape in got["shapes"]:
        assert sum(tuple(o) == tuple(shape) for o in got["opt"]) >= 2
