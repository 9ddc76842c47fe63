"""Built-in PyTorch models. Inputs arrive NCHW; the same architectures exist for Keras."""

from __future__ import annotations

import torch
from torch import nn


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 1
    for d in input_shape:
        width *= d
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: int) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * (h // 2) * (w // 2), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, channels: int, blocks: int) -> nn.Module:
    """A small ResNet (3 stages, channels doubling): compute-bound on a CPU, like ResNet-50 is on a GPU."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    cin = channels
    for stage in range(3):
        cout = channels * 2**stage
        for b in range(blocks):
            layers.append(_Block(cin, cout, 2 if (b == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build(spec, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if spec.name == "mlp":
        return mlp(input_shape, num_classes, spec.hidden)
    if spec.name == "cnn":
        return cnn(input_shape, num_classes, spec.channels)
    if spec.name == "resnet":
        return resnet(input_shape, num_classes, spec.channels, spec.blocks)
    raise ValueError(f"no built-in torch model {spec.name!r}")
