"""The trained Keras 3 model on the job's parent run, with ``mlflow.keras`` (rank 0, FINISHED jobs).

Reached through ``TensorFlowBackend.log_model`` from hvdkit.tracking._logged_model, which sets the
store and experiment and bounds the call. ``mlflow.keras.log_model`` takes no ``run_id``, so this
goes through ``mlflow.models.Model.log`` with the keras flavour, what that function calls itself.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import numpy as np

_EXAMPLE_ROWS = 5


def example_rows(backend) -> np.ndarray | None:
    """A few real validation inputs, as the model takes them (NHWC float32)."""
    if not backend.streamed:
        x = backend.x_val if backend.x_val is not None and len(backend.x_val) else backend.x
        return np.asarray(x[:_EXAMPLE_ROWS], dtype=np.float32)
    for x, _ in backend._val_batches():
        return np.asarray(x[:_EXAMPLE_ROWS], dtype=np.float32)
    return None


def pip_requirements() -> list[str]:
    """Pinned, not inferred: MLflow's inference loads the model in a subprocess (seconds)."""
    reqs = []
    tf = "tensorflow-cpu" if _installed("tensorflow-cpu") else "tensorflow"
    for dist in (tf, "keras", "mlflow", "numpy"):
        if _installed(dist):
            reqs.append(f"{dist}=={metadata.version(dist)}")
    return reqs


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _uncompiled(model):
    """The model without its optimizer: a Keras-fit model is compiled with hvdkit's
    DistributedKerasOptimizer, which a loader without hvdkit cannot rebuild (and serving never
    needs). A functional model is rewrapped (same layers and weights, never compiled:
    ``clone_model`` keeps the compile state in Keras 3); a subclassed one is logged as it is."""
    import keras

    if not getattr(model, "compiled", False):
        return model
    try:
        return keras.Model(model.inputs, model.outputs, name=model.name)
    except Exception:  # noqa: BLE001 - a subclassed model has no symbolic inputs
        return model


def log_model(backend, run_id: str, *, name: str, registered_model_name: str | None = None, step: int = 0) -> Any:
    import mlflow.keras
    from mlflow.models import Model, infer_signature

    model = _uncompiled(backend.model)
    example = example_rows(backend)
    signature = None
    if example is not None:
        out = np.asarray(model(example, training=False), dtype=np.float32)  # bf16 models: float32 logits
        signature = infer_signature(example, out)
    # No input example: mlflow.keras.save_model (3.17) writes it before creating the model's
    # folder, and Model.log then fails reading it back (FileNotFoundError input_example.json);
    # the signature alone lets pyfunc and serving check inputs.
    return Model.log(artifact_path=None, name=name, flavor=mlflow.keras, run_id=run_id, model=model,
                     signature=signature, pip_requirements=pip_requirements(),
                     registered_model_name=registered_model_name, step=step, save_exported_model=False)
