"""A Python recipe: a custom model for both frameworks, trained on the digits data.

    hvdkit run recipes/custom_model.py -np 2 --framework torch
    hvdkit run recipes/custom_model.py -np 2 --framework tensorflow

hvdkit does the distributed part exactly as for YAML recipes; the class only says what to train.
"""

from hvdkit.recipe import PythonRecipe


class GatedMLP(PythonRecipe):
    # The same fields as a YAML recipe; model "custom" means: call build_model below.
    config = {
        "name": "custom-gated-mlp",
        "model": {"name": "custom"},
        "data": {"name": "digits"},
        "batch_size": 32,
        "epochs": 12,
        "optimizer": {"name": "adam", "lr": 0.002},
        "lr_schedule": {"scale": "sqrt", "warmup_epochs": 1},
    }

    def build_model(self, framework, input_shape, num_classes):
        width = 1
        for d in input_shape:
            width *= d
        if framework == "torch":
            import torch
            from torch import nn

            class Gated(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.value, self.gate = nn.Linear(width, 128), nn.Linear(width, 128)
                    self.out = nn.Linear(128, num_classes)

                def forward(self, x):
                    x = x.flatten(1)
                    return self.out(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x)))

            return Gated()
        import keras

        inp = keras.Input(input_shape)
        x = keras.layers.Flatten()(inp)
        h = keras.layers.Multiply()([keras.layers.Dense(128, activation="tanh")(x),
                                     keras.layers.Dense(128, activation="sigmoid")(x)])
        return keras.Model(inp, keras.layers.Dense(num_classes)(h))
