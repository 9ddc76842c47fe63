"""Datasets as plain numpy arrays, and the built-in ones. Nothing is downloaded, ever."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hvdkit.errors import RecipeError


@dataclass
class ArrayDataset:
    """Images are channel-last (N, H, W, C) float32; labels int64 class ids."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int, num_classes: int) -> ArrayDataset:
    # A fixed permutation, identical on every rank (same seed), so every rank holds the same split.
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = perm[:n_val], perm[n_val:]
    return ArrayDataset(x[train], y[train], x[val], y[val], num_classes)


def digits(val_fraction: float, seed: int) -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped inside the package)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]  # (N, 8, 8, 1), in [0, 1]
    return _split(x, d.target.astype(np.int64), val_fraction, seed, 10)


def synthetic(num_samples: int, image_size: int, channels: int, num_classes: int, val_fraction: float, seed: int) -> ArrayDataset:
    """Generated images, the counterpart of Horovod's synthetic benchmarks: throughput, not accuracy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, image_size, image_size, channels), dtype=np.float32)
    y = rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    return _split(x, y, val_fraction, seed, num_classes)


def load_builtin(data_spec, seed: int) -> ArrayDataset:
    if data_spec.name == "digits":
        return digits(data_spec.val_fraction, seed)
    if data_spec.name == "synthetic":
        return synthetic(data_spec.num_samples, data_spec.image_size, data_spec.channels,
                         data_spec.num_classes, data_spec.val_fraction, seed)
    raise RecipeError(f"data.name {data_spec.name!r} has no built-in loader", fix="use digits or synthetic, or a Python recipe's build_data")
