"""A recipe whose steps take a known time on any machine: digits through one linear layer whose
forward sleeps. Fault tests (outage, elastic) need jobs that outlast what they do to them."""

from __future__ import annotations

from pathlib import Path

_RECIPE = '''
"""digits through one linear layer whose forward sleeps {step_s} s: a job of known length."""
import time

from hvdkit.recipe import PythonRecipe

STEP_S = {step_s}


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
                    time.sleep(STEP_S)
                    return self.fc(x.flatten(1))

            return PacedLinear()
        import keras
        import numpy as np
        import tensorflow as tf

        def pause(x):
            # runs at every call of the traced step, not once while tracing
            z = tf.numpy_function(lambda: np.float32(time.sleep(STEP_S) or 0.0), [], tf.float32)
            return x + tf.reshape(z, [1, 1]) * 0.0

        return keras.Sequential([keras.layers.Input(shape=input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(num_classes), keras.layers.Lambda(pause)])
'''


def write_paced_recipe(path: Path, *, name: str, steps: int, log_every: int, step_s: float, batch_size: int = 32,
                       evaluate: bool = False) -> Path:
    config = {"name": name, "model": {"name": "custom"}, "data": {"name": "digits"}, "batch_size": batch_size,
              "steps": steps, "eval": {"enabled": evaluate}, "checkpoint": {"dir": None},
              "log": {"every_steps": log_every, "progress": False}}
    path.write_text(_RECIPE.format(step_s=step_s, config=repr(config)))
    return path
