"""Python recipes: a small class for what YAML cannot say (a custom model, custom data)."""

from __future__ import annotations

from typing import Any, ClassVar


class PythonRecipe:
    """Subclass this in a ``.py`` file and point ``hvdkit run`` at the file.

    ``config`` holds the same fields as a YAML recipe. Override what you need:

    - ``build_model(framework, input_shape, num_classes)`` returns a ``torch.nn.Module`` or a
      ``keras.Model`` for the framework asked for (import the framework inside the method);
    - ``build_data(seed)`` returns an :class:`hvdkit.core.data.ArrayDataset` (numpy arrays,
      images channel-last); the default loads ``config['data']``'s built-in dataset.
    hvdkit does the Horovod part (sharding, optimizer wrapping, broadcasts, averaging).
    """

    config: ClassVar[dict[str, Any]] = {}

    def build_model(self, framework: str, input_shape: tuple[int, ...], num_classes: int):
        return None  # None: use the built-in model named in config['model']

    def build_data(self, seed: int):
        return None  # None: use the built-in dataset named in config['data']
