"""Issue 15 item 2: a FINISHED job's trained model and its data in MLflow (real np=2 jobs, a real store)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, explain, hvdkit, sqlite_store, worker_env

pytestmark = pytest.mark.horovod

DIGITS = "recipes/digits.yaml"
QUICK = ["log.progress=false"]


def _job(tmp: Path, framework: str, *overrides: str) -> dict:
    """One np=2 digits job on its own sqlite store; its parent run, logged models and marks."""
    from mlflow import MlflowClient

    uri = sqlite_store(tmp)
    res = hvdkit(["run", str(REPO / DIGITS), "-np", "2", "--framework", framework, *QUICK,
                  f"checkpoint.dir={tmp / 'ck'}", "--summary-json", str(tmp / "summary.json"), *overrides],
                 cwd=tmp, env=worker_env(MLFLOW_TRACKING_URI=uri), timeout=300)
    assert res.returncode == 0, explain(res)
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(exps, "tags.`hvdkit.role` = 'parent'")
    models = client.search_logged_models(exps)
    marks = json.loads((tmp / "summary.json").read_text())["marks"]
    return {"uri": uri, "client": client, "run": parent, "models": models, "res": res, "tmp": tmp,
            "log_s": marks["log_model_end"] - marks["log_model_start"]}


def _artifact_bytes(model) -> int:
    root = model.artifact_location.removeprefix("file://")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def _load(job, model):
    import mlflow

    mlflow.set_tracking_uri(job["uri"])
    try:
        return mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    finally:
        mlflow.set_tracking_uri(None)


def _digits_val():
    from hvdkit.core.data import digits

    return digits(0.2, 42)  # the recipe's split (val_fraction 0.2, seed 42)


@pytest.fixture(scope="module")
def torch_job(tmp_path_factory):
    return _job(tmp_path_factory.mktemp("torch"), "torch", "epochs=3", "log.register_model=digits-torch")


@pytest.fixture(scope="module")
def tf_job(tmp_path_factory):
    return _job(tmp_path_factory.mktemp("tf"), "tensorflow", "epochs=2", "keras_fit=true")


def test_torch_model_is_on_the_parent_run_and_predicts_like_the_run_says(torch_job):
    run, (model,) = torch_job["run"], torch_job["models"]
    assert run.info.status == "FINISHED"  # logging the model neither ended nor reopened the run
    assert model.source_run_id == run.info.run_id and model.name == "model"
    assert model.experiment_id == run.info.experiment_id
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    pyfunc = _load(torch_job, model)
    sig = pyfunc.metadata.signature
    assert sig is not None and sig.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 1, 8, 8], (-1, 1, 8, 8))
    data = _digits_val()
    logits = np.asarray(pyfunc.predict(np.ascontiguousarray(data.x_val.transpose(0, 3, 1, 2))))
    acc = float((logits.argmax(1) == data.y_val).mean())
    run_acc = run.data.metrics["val_accuracy"]
    assert run_acc >= 0.9, run_acc
    assert abs(acc - run_acc) <= 0.01, (acc, run_acc)
    size = _artifact_bytes(model)
    print(f"\n[measure] torch digits logged model: {size} bytes, log_model_and_data {torch_job['log_s']:.2f} s")
    assert 0 < size < 5_000_000


def test_torch_dataset_inputs_and_shard_layout(torch_job):
    run = torch_job["run"]
    inputs = {dict((t.key, t.value) for t in i.tags)["mlflow.data.context"]: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"}
    train = inputs["training"]
    assert train.dataset.name == "digits" and len(train.dataset.digest) >= 8
    assert train.dataset.digest != inputs["validation"].dataset.digest
    assert train.dataset.source_type == "local" and "digits.csv.gz" in train.dataset.source
    assert json.loads(train.dataset.profile)["features_shape"] == list(_digits_val().x_train.shape)
    layout = json.loads(run.data.tags["hvdkit.shard_layout"])
    assert layout == json.loads(dict((t.key, t.value) for t in train.tags)["hvdkit.shard_layout"])
    assert layout["global_batch"] == 64
    assert layout["ranks"]["0"]["batch_rows"] == [0, 32] and layout["ranks"]["1"]["batch_rows"] == [32, 64]
    assert layout["ranks"]["0"]["val_rows"] == [0, 180] and layout["ranks"]["1"]["val_rows"] == [180, 359]


def test_register_model_makes_version_1(torch_job):
    client, (model,) = torch_job["client"], torch_job["models"]
    (version,) = client.search_model_versions("name = 'digits-torch'")
    assert str(version.version) == "1" and version.run_id == torch_job["run"].info.run_id
    assert model.model_id in version.source


def test_tensorflow_keras_fit_model_loads_and_predicts(tf_job):
    run, (model,) = tf_job["run"], tf_job["models"]
    assert run.info.status == "FINISHED" and model.source_run_id == run.info.run_id
    pyfunc = _load(tf_job, model)
    assert pyfunc.metadata.signature is not None
    assert "keras" in pyfunc.metadata.flavors
    data = _digits_val()
    logits = np.asarray(pyfunc.predict(data.x_val.astype(np.float32)))
    assert logits.shape == (len(data.y_val), 10)
    acc = float((logits.argmax(1) == data.y_val).mean())
    assert abs(acc - run.data.metrics["val_accuracy"]) <= 0.01, (acc, run.data.metrics["val_accuracy"])
    size = _artifact_bytes(model)
    print(f"\n[measure] tensorflow digits logged model: {size} bytes, log_model_and_data {tf_job['log_s']:.2f} s")
    assert 0 < size < 10_000_000


def test_log_model_false_logs_no_model_but_the_data(tmp_path):
    job = _job(tmp_path, "torch", "steps=5", "eval.enabled=false", "log.model=false")
    assert job["run"].info.status == "FINISHED"
    assert job["models"] == [] and not job["run"].outputs.model_outputs
    assert {dict((t.key, t.value) for t in i.tags)["mlflow.data.context"] for i in job["run"].inputs.dataset_inputs} \
        == {"training", "validation"}
    print(f"\n[measure] log.model=false: datasets only {job['log_s']:.2f} s")
