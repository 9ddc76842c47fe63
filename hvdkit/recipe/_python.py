"""Python recipes: a small class for what YAML cannot say (a custom model, custom data)."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar


class PythonRecipe:
    """Subclass this in a ``.py`` file and point ``hvdkit run`` at the file.

    ``config`` holds the same fields as a YAML recipe. Override what you need:

    - ``build_model(framework, input_shape, num_classes)`` returns a ``torch.nn.Module`` or a
      ``keras.Model`` for the framework asked for (import the framework inside the method). With
      ``parallel.model`` > 1 (torch), a ``build_model`` that also takes ``parallel=None`` gets a
      ``hvdkit.torch._tensor_parallel.ParallelContext``: build the split layers with
      ``ColumnParallelLinear`` / ``RowParallelLinear(..., parallel.model_set)``, named as the
      unsplit model's ``torch.nn.Linear`` so checkpoints (always the unsplit model) load into it;
    - ``build_data(seed)`` returns an :class:`hvdkit.core.data.ArrayDataset` (numpy arrays,
      images channel-last), or :class:`hvdkit.core.data.DataSplits` around your framework's own
      pipeline (a map-style ``torch.utils.data.Dataset`` or a ``tf.data.Dataset``), which hvdkit
      shards per rank; the default loads ``config['data']``'s built-in dataset.
    hvdkit does the Horovod part (sharding, optimizer wrapping, broadcasts, averaging).
    """

    config: ClassVar[dict[str, Any]] = {}

    def build_model(self, framework: str, input_shape: tuple[int, ...], num_classes: int):
        return None  # None: use the built-in model named in config['model']

    def build_data(self, seed: int):
        return None  # None: use the built-in dataset named in config['data']


def overrides_build_model(py: PythonRecipe | None) -> bool:
    """Does this recipe build its own model (rather than the built-in one in config['model'])?"""
    return py is not None and type(py).build_model is not PythonRecipe.build_model


def overrides_build_data(py: PythonRecipe | None) -> bool:
    """Does this recipe load its own data (rather than the built-in dataset in config['data'])?"""
    return py is not None and type(py).build_data is not PythonRecipe.build_data


def accepts_parallel(py: PythonRecipe | None) -> bool:
    """Does its build_model take a ``parallel`` context (a model it can split itself)?"""
    if not overrides_build_model(py):
        return False
    try:
        return "parallel" in inspect.signature(py.build_model).parameters
    except (TypeError, ValueError):
        return False


def model_kind(py: PythonRecipe | None) -> dict[str, bool]:
    """``check_recipe_layout``'s ``custom_model`` (its own model, which hvdkit cannot split) and
    ``splits_itself`` (its build_model takes ``parallel``), on either framework."""
    splits = accepts_parallel(py)
    return {"custom_model": overrides_build_model(py) and not splits, "splits_itself": splits}
