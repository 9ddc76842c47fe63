"""Datasets: plain numpy arrays (the built-in ones), shard folders streamed from files, and a
Python recipe's own pipeline. Nothing is downloaded, ever."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

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


@dataclass
class DataSplits:
    """Training data that is not held whole in memory: a shard folder's splits
    (:class:`hvdkit.core.files.ShardedSplit`), or what a Python recipe's ``build_data`` returns
    for a pipeline of its own: a ``torch.utils.data.Dataset`` (map-style, items ``(x, y)``) or a
    ``tf.data.Dataset`` of unbatched ``(x, y)`` elements. hvdkit shards ``train`` per rank (disjoint,
    reshuffled every epoch from the shared seed, the same number of steps on every rank) and each
    rank evaluates its slice of ``val`` (None: no evaluation data, set ``eval.enabled: false``).
    """

    train: Any
    val: Any = None
    num_classes: int = 0
    # None: the shape of one training sample, as the pipeline gives it (a torch Dataset's items are
    # usually channel-first, a tf.data pipeline's channel-last: the model is built for that shape).
    input_shape: tuple[int, ...] | None = None
    # tf.data only: element -> (x, y), mapped after sharding, so that a rank reads and decodes only
    # its own samples (sharding a dataset that already decodes makes every rank decode them all).
    decode: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise RecipeError(f"DataSplits(num_classes={self.num_classes}): a classifier needs at least 2 classes",
                              fix="pass num_classes=K, the number of labels in your data")
        if self.decode is not None and not hasattr(self.train, "element_spec"):
            raise RecipeError(f"DataSplits(decode=...) with a {type(self.train).__name__}: decode is for tf.data pipelines",
                              fix="read and decode in your Dataset's __getitem__ instead (it only runs for this rank's samples)")
        if self.input_shape is None:
            self.input_shape = sample_shape(self.train.map(self.decode) if self.decode is not None else self.train)
        self.input_shape = tuple(int(d) for d in self.input_shape)

    @property
    def kind(self) -> str:
        """``arrays`` never; ``files`` (a shard folder), ``torch`` or ``tf.data``: who reads it."""
        return pipeline_kind(self.train)


def pipeline_kind(obj: Any) -> str:
    """Which framework a pipeline belongs to, by duck type (no framework is imported here)."""
    from hvdkit.core.files import ShardedSplit

    if isinstance(obj, ShardedSplit):
        return "files"
    mod = type(obj).__module__
    if any(c.__name__ == "PyDataset" and c.__module__.startswith("keras") for c in type(obj).__mro__):
        return "keras"  # a keras.utils.PyDataset: items are whole batches
    if hasattr(obj, "element_spec") or mod.startswith(("tensorflow", "keras")):
        return "tf.data"
    if mod.startswith("torch") or any(c.__module__.startswith("torch.utils.data") for c in type(obj).__mro__):
        return "torch"
    return "unknown"


def check_data(data: Any, recipe, *, elastic: bool) -> None:
    """What ``build_data`` (or a shard folder) gave, against the job: one line and exit 2, run by
    ``hvdkit run`` before launching and by every rank before training. Framework-free: the
    pipeline's framework is told by its type's module; the framework layer checks it again."""
    if isinstance(data, ArrayDataset):
        return
    if not isinstance(data, DataSplits):
        raise RecipeError(f"build_data returned {type(data).__name__}",
                          fix="return an hvdkit.core.data.ArrayDataset (numpy arrays) or DataSplits(train=..., val=..., "
                              "num_classes=...) around a torch Dataset or a tf.data.Dataset")
    kind = data.kind
    wanted = {"torch": "torch", "tensorflow": "tf.data"}[recipe.framework]
    if kind not in ("files", wanted) and not (kind == "keras" and recipe.framework == "tensorflow"):
        raise RecipeError(
            f"build_data returned a {kind} pipeline ({type(data.train).__name__}) but this job runs on {recipe.framework}",
            fix=f"return {'torch.utils.data.Dataset' if wanted == 'torch' else 'tf.data.Dataset'} objects for "
                f"--framework {recipe.framework}, or run --framework {'tensorflow' if wanted == 'torch' else 'torch'}")
    if elastic:
        raise RecipeError(f"streamed data ({kind}) in an elastic job: elastic jobs train on in-memory arrays for now",
                          fix="run without elastic options, or use data.name digits/synthetic")
    if data.val is None and recipe.eval.enabled:
        raise RecipeError("the data has no validation split (val=None) but eval.enabled is true",
                          fix="pass val=... to DataSplits (or write the shard folder with a val split), "
                              "or set eval.enabled: false")


def sample_shape(train: Any) -> tuple[int, ...]:
    """The shape of one ``x`` from a pipeline: a tf.data element spec, else the first item."""
    spec = getattr(train, "element_spec", None)
    if spec is not None:
        return tuple(int(d) for d in spec[0].shape)
    if hasattr(train, "input_shape"):
        return tuple(train.input_shape)
    # A map-style dataset's first item, else a stream's first element (read once more by training)
    if pipeline_kind(train) == "keras":  # a PyDataset's item is a batch: drop its batch axis
        return tuple(int(d) for d in train[0][0].shape[1:])
    try:
        first = train[0]
    except (NotImplementedError, TypeError, AttributeError):  # torch's IterableDataset has no items
        first = next(iter(train))
    return tuple(int(d) for d in first[0].shape)


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int, num_classes: int) -> ArrayDataset:
    # A fixed permutation, identical on every rank (same seed), so every rank holds the same split.
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = perm[:n_val], perm[n_val:]
    return ArrayDataset(x[train], y[train], x[val], y[val], num_classes)


def digits_csv() -> Path | None:
    """The CSV scikit-learn ships its 8x8 digits in, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # a top-level find_spec imports nothing
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits(val_fraction: float, seed: int) -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped inside the package).

    Read as ``load_digits`` reads them (one CSV row an image, the label last), but without importing
    scikit-learn: that import is over a second of every rank's start (docs/testing.md)."""
    path = digits_csv()
    if path is None:
        from sklearn.datasets import load_digits  # the file moved: scikit-learn knows where

        d = load_digits()
        images, target = d.images, d.target
    else:
        rows = np.loadtxt(path, delimiter=",")
        images, target = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1]
    x = (images.astype(np.float32) / 16.0)[..., None]  # (N, 8, 8, 1), in [0, 1]
    return _split(x, target.astype(np.int64), val_fraction, seed, 10)


def synthetic(num_samples: int, image_size: int, channels: int, num_classes: int, val_fraction: float, seed: int) -> ArrayDataset:
    """Generated images, the counterpart of Horovod's synthetic benchmarks: throughput, not accuracy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, image_size, image_size, channels), dtype=np.float32)
    y = rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    return _split(x, y, val_fraction, seed, num_classes)


def load_builtin(data_spec, seed: int) -> ArrayDataset | DataSplits:
    if data_spec.name == "files":
        from hvdkit.core.files import ShardFolder

        folder = ShardFolder.open(data_spec.path)  # checked here: a bad folder fails before any worker trains
        return DataSplits(folder.train, folder.val, folder.num_classes, folder.input_shape)
    if data_spec.name == "digits":
        return digits(data_spec.val_fraction, seed)
    if data_spec.name == "synthetic":
        return synthetic(data_spec.num_samples, data_spec.image_size, data_spec.channels,
                         data_spec.num_classes, data_spec.val_fraction, seed)
    raise RecipeError(f"data.name {data_spec.name!r} has no built-in loader", fix="use digits, synthetic or files, or a Python recipe's build_data")
