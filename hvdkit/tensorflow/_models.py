"""Built-in Keras 3 models: the architectures of ``hvdkit.torch._models``, channel-last (NHWC).

Layer for layer the same as the PyTorch twins (widths, kernels, padding, pooling, BatchNorm
momentum and epsilon), so a recipe trains the same network on either framework. Initialisers are
each framework's defaults.
"""

from __future__ import annotations

import keras
from keras import layers


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = layers.Flatten()(inputs)
    for h in hidden:
        x = layers.Dense(h, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="mlp")


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: int) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(channels, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(2 * channels, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="cnn")


def _bn() -> layers.BatchNormalization:
    # torch.nn.BatchNorm2d defaults: running-average momentum 0.1 (Keras counts the other way), eps 1e-5.
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)


def _conv3x3(x, filters: int, stride: int):
    # torch's padding=1 is symmetric; TF's "same" pads bottom/right only when striding by 2.
    if stride == 1:
        return layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.ZeroPadding2D(1)(x)
    return layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False)(x)


def _block(x, cin: int, cout: int, stride: int):
    y = layers.ReLU()(_bn()(_conv3x3(x, cout, stride)))
    y = _bn()(_conv3x3(y, cout, 1))
    skip = x
    if stride != 1 or cin != cout:
        skip = _bn()(layers.Conv2D(cout, 1, strides=stride, use_bias=False)(x))
    return layers.ReLU()(layers.Add()([y, skip]))


def resnet(input_shape: tuple[int, ...], num_classes: int, channels: int, blocks: int) -> keras.Model:
    """A small ResNet (3 stages, channels doubling): compute-bound on a CPU, like ResNet-50 is on a GPU."""
    inputs = keras.Input(shape=input_shape)
    x = layers.ReLU()(_bn()(_conv3x3(inputs, channels, 1)))
    cin = channels
    for stage in range(3):
        cout = channels * 2**stage
        for b in range(blocks):
            x = _block(x, cin, cout, 2 if (b == 0 and stage > 0) else 1)
            cin = cout
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="resnet")


def build(spec, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    if spec.name == "mlp":
        return mlp(input_shape, num_classes, spec.hidden)
    if spec.name == "cnn":
        return cnn(input_shape, num_classes, spec.channels)
    if spec.name == "resnet":
        return resnet(input_shape, num_classes, spec.channels, spec.blocks)
    raise ValueError(f"no built-in keras model {spec.name!r}")
