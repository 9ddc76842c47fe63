"""A recipe whose steps take a known time on any machine: digits through one linear layer whose
forward sleeps. Fault tests (outage, elastic) need jobs that outlast what they do to them."""

from __future__ import annotations

from pathlib import Path

_RECIPE = '''
"""digits through one linear layer whose forward sleeps {step_s} s: a job of known length."""
import time

from hvdkit.recipe import PythonRecipe

STEP_S = {step_s}
PACE_FILE = {pace_file!r}  # when set and there, it holds the sleep per forward instead (a test changes it mid-job)


def pace():
    if PACE_FILE:
        try:
            with open(PACE_FILE) as f:
                return float(f.read())
        except (OSError, ValueError):  # not there (or being replaced)
            pass
    return STEP_S


class Paced(PythonRecipe):
    config = {config}

    def build_model(self, framework, input_shape, num_classes):
        width = 1
        for d in input_shape:
            width *= d
        if framework == "torch":
            import torch

            class PacedLinear(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = torch.nn.Linear(width, num_classes)

                def forward(self, x):
                    time.sleep(pace())
                    return self.fc(x.flatten(1))

            return PacedLinear()
        import keras
        import numpy as np
        import tensorflow as tf

        def pause(x):
            # runs at every call of the traced step, not once while tracing
            z = tf.numpy_function(lambda: np.float32(time.sleep(pace()) or 0.0), [], tf.float32)
            return x + tf.reshape(z, [1, 1]) * 0.0

        return keras.Sequential([keras.layers.Input(shape=input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(num_classes), keras.layers.Lambda(pause)])
'''


def write_paced_recipe(path: Path, *, name: str, steps: int, log_every: int, step_s: float, batch_size: int = 32,
                       evaluate: bool = False, pace_file: Path | None = None) -> Path:
    """``pace_file``: a file whose number, while it is there, replaces ``step_s`` (read at every forward)."""
    config = {"name": name, "model": {"name": "custom"}, "data": {"name": "digits"}, "batch_size": batch_size,
              "steps": steps, "eval": {"enabled": evaluate}, "checkpoint": {"dir": None},
              "log": {"every_steps": log_every, "progress": False}}
    path.write_text(_RECIPE.format(step_s=step_s, config=repr(config), pace_file=str(pace_file) if pace_file else None))
    return path
