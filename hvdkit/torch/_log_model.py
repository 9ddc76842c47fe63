"""The trained PyTorch model on the job's parent run, with ``mlflow.pytorch`` (rank 0, FINISHED jobs).

Reached through ``TorchBackend.log_model`` from hvdkit.tracking._logged_model, which sets the store
and experiment and bounds the call.
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any

import numpy as np

_EXAMPLE_ROWS = 5


def example_rows(backend) -> np.ndarray | None:
    """A few real validation inputs, as the model takes them (NCHW float32): the signature is
    inferred from them and the model's output, and they are the input example."""
    import torch

    if not backend.streamed:
        x = backend.x_val if backend.x_val is not None and len(backend.x_val) else backend.x
        return x[:_EXAMPLE_ROWS].numpy()
    for x, _ in backend._val_batches():
        return torch.as_tensor(x)[:_EXAMPLE_ROWS].float().numpy()
    return None


def pip_requirements() -> list[str]:
    """Pinned, not inferred: MLflow's inference loads the model in a subprocess (seconds)."""
    reqs = []
    for dist in ("torch", "mlflow", "numpy", "cloudpickle"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")  # torch 2.x+cpu: the local tag is no pin
        except metadata.PackageNotFoundError:
            pass
    return reqs


def log_model(backend, run_id: str, *, name: str, registered_model_name: str | None = None, step: int = 0) -> Any:
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = backend.model
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # loads and serves without the training GPU
    was_training = model.training
    model.eval()
    try:
        example = example_rows(backend)
        signature = None
        if example is not None:
            with torch.no_grad():
                out = model(torch.from_numpy(example)).float().numpy()
            signature = infer_signature(example, out)
        # run_id reaches mlflow.models.Model.log through log_model's **kwargs: the model joins the
        # existing parent run, which is neither started nor ended here.
        return mlflow.pytorch.log_model(model, name=name, signature=signature, input_example=example,
                                        pip_requirements=pip_requirements(), registered_model_name=registered_model_name,
                                        step=step, run_id=run_id)
    finally:
        model.train(was_training)
