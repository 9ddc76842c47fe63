"""The trained model and its data on a FINISHED job's parent run (rank 0 only; framework-free).

The model is logged by the framework layer's ``backend.log_model`` (duck-typed: MLflow's flavour
for the framework); the datasets, their shard layout and the bounded, warn-once wrapping are here.
Unlike the metrics these are direct MLflow calls, not spool events: MLflow 3 makes a logged model
an entity of its own (the Models tab), created with its artifacts in one call, which a replayed
spool could not do. So a store that is down costs the model, never the job: one warning, and the
whole attempt is bounded (``$HVDKIT_LOG_MODEL_TIMEOUT_S``, default 300 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hvdkit.tracking import keys
from hvdkit.tracking._uri import resolve_tracking_uri

_DEFAULT_TIMEOUT_S = 300.0


def log_model_and_data(tracker: Any, backend: Any, recipe: Any, data: Any, layout: str,
                       recipe_path: str | None = None, step: int = 0) -> dict:
    """Rank 0, FINISHED job: log the datasets (``log.model`` or not: they describe the job) and,
    unless ``log.model: false``, the trained model on the parent run. Returns what was done
    (``{"model_id": ..., "seconds": ...}``); a failure is one warning on stderr, never raised."""
    run_id = getattr(tracker, "run_id", None)
    if not run_id:
        return {}  # --no-track, or the store never answered: the spool has nothing to attach it to
    uri = resolve_tracking_uri(getattr(tracker.config, "tracking_uri", None))
    timeout = float(os.environ.get(keys.ENV_LOG_MODEL_TIMEOUT_S) or _DEFAULT_TIMEOUT_S)
    out: dict = {}

    def work() -> None:
        try:
            out.update(_log(uri, run_id, backend, recipe, data, layout, recipe_path, step))
        except BaseException as exc:  # noqa: BLE001 - reported once below; the job has finished
            out["error"] = exc

    t0 = time.perf_counter()
    # A daemon thread: a store that hangs (MLflow retries an unreachable server for minutes) is
    # abandoned after `timeout`, and the process still exits (hvdkit.train._exit).
    thread = threading.Thread(target=work, name="hvdkit-log-model", daemon=True)
    thread.start()
    thread.join(timeout)
    out["seconds"] = time.perf_counter() - t0
    if thread.is_alive():
        _warn(f"no answer from the MLflow store within {timeout:.0f} s")
    elif "error" in out:
        exc = out.pop("error")
        _warn(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
    return out


def _warn(problem: str) -> None:
    print(f"hvdkit: warning: the trained model and dataset were not logged to MLflow ({problem}) — fix: the "
          f"checkpoints still hold the model; check the store, or set log.model: false",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def _store(uri: str, experiment_id: str):
    """MLflow's fluent model logging reads the store and experiment from its globals: point them
    at the job's for the call and put back what was there (hvdkit never leaves MLflow's global URI
    set: user code in the process keeps its own)."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_ID"] = uri, experiment_id
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)  # would win over the id, and may name another experiment
    previous_uri = mlflow.get_tracking_uri()  # the environment's, unless user code set one
    if previous_uri != uri:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous_uri != uri:
            mlflow.set_tracking_uri(previous_uri)
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _log(uri: str, run_id: str, backend: Any, recipe: Any, data: Any, layout: str, recipe_path: str | None,
         step: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)  # also the cheap "is the store there" probe before the heavy part
    client.log_inputs(run_id, datasets=dataset_inputs(recipe, data, recipe_path, layout))
    client.set_tag(run_id, keys.TAG_SHARD_LAYOUT, layout)
    out: dict = {}
    if not recipe.log.model:
        return out
    if getattr(backend, "split", False):
        # Each rank holds slices; the unsplit model is gathered only into checkpoints.
        print("hvdkit: the model is split (parallel.model > 1): not logged to MLflow; its last checkpoint holds "
              "it unsplit", file=sys.stderr, flush=True)
        return out
    log_model = getattr(backend, "log_model", None)
    if log_model is None:
        return out
    with _store(uri, run.info.experiment_id):
        info = log_model(run_id, name=keys.LOGGED_MODEL_NAME, registered_model_name=recipe.log.register_model,
                         step=int(step))  # links the model to the run's metrics at its last step
    out["model_id"] = getattr(info, "model_id", None)
    out["model_uri"] = getattr(info, "model_uri", None)
    return out


# -- the data --------------------------------------------------------------------------------
def dataset_inputs(recipe: Any, data: Any, recipe_path: str | None, layout: str) -> list:
    """One dataset input per split, with its context tag; the training one also carries the layout."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag

    out = []
    for context, split in ((keys.CONTEXT_TRAINING, "train"), (keys.CONTEXT_VALIDATION, "val")):
        ds = _dataset(recipe, data, split, recipe_path)
        if ds is None:
            continue
        d = ds.to_dict()
        entity = DatasetEntity(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                               schema=d.get("schema"), profile=d.get("profile"))
        tags = [InputTag(key=keys.DATASET_CONTEXT_TAG, value=context)]
        if context == keys.CONTEXT_TRAINING:
            tags.append(InputTag(key=keys.TAG_SHARD_LAYOUT, value=layout))
        out.append(DatasetInput(dataset=entity, tags=tags))
    return out


def _dataset(recipe: Any, data: Any, split: str, recipe_path: str | None):
    """An ``mlflow.data`` dataset for one split: in-memory arrays with their digest and profile;
    a shard folder or a recipe's pipeline as a MetaDataset (its metadata, never its samples)."""
    import mlflow.data
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    name = recipe.data.name
    if hasattr(data, "x_train"):  # ArrayDataset
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_val, data.y_val)
        if not len(x):
            return None
        return mlflow.data.from_numpy(x, source=_array_source(recipe, recipe_path), targets=y, name=name)
    part = data.train if split == "train" else data.val
    if part is None:
        return None
    schema = _schema(data.input_shape)
    files = getattr(part, "files", None)
    if files is not None:  # a shard folder's split (hvdkit.core.files.ShardedSplit)
        digest = hashlib.sha256(json.dumps([[Path(f).name, int(r), Path(f).stat().st_size]
                                            for f, r in zip(files, part.rows)]).encode()).hexdigest()[:8]
        return MetaDataset(LocalArtifactDatasetSource(str(Path(part.path).resolve())), name=name, digest=digest,
                           schema=schema)
    return MetaDataset(_code_source(recipe_path, type(part).__name__), name=name, schema=schema)


def _array_source(recipe: Any, recipe_path: str | None):
    from mlflow.data.sources import LocalArtifactDatasetSource

    if recipe.data.name == "digits":
        spec = importlib.util.find_spec("sklearn")  # the copy scikit-learn ships (load_digits); imports nothing
        if spec is not None and spec.origin:
            return LocalArtifactDatasetSource(str(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"))
    what = f"synthetic(seed={recipe.seed})" if recipe.data.name == "synthetic" else "build_data"
    return _code_source(recipe_path, what)


def _code_source(recipe_path: str | None, what: str):
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource({"mlflow.source.name": str(recipe_path or "hvdkit recipe"), "hvdkit.pipeline": what})


def _schema(input_shape):
    import numpy as np
    from mlflow.types import Schema, TensorSpec

    return Schema([TensorSpec(np.dtype(np.float32), (-1, *[int(d) for d in input_shape]), "x")])


__all__ = ["dataset_inputs", "log_model_and_data"]
