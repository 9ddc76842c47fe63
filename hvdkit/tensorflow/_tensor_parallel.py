"""Tensor (intra-layer) model parallelism on Horovod process sets, TensorFlow / Keras 3.

The layers of :mod:`hvdkit.torch._tensor_parallel` as Keras layers (see there for the scheme):
:class:`ColumnParallelDense` holds a slice of the output features (allgather if asked),
:class:`RowParallelDense` a slice of the input features (allreduce-sum of partial sums, bias once
after it), :class:`TensorParallelMLP` column-then-row pairs, one allreduce per pair and pass.

The backward collectives are written with ``tf.custom_gradient``, not left to the gradients
Horovod registers for its ops: Horovod differentiates an allreduce-sum as another allreduce-sum,
which for the row layer's sum would multiply the gradient by the group size (every member already
holds the whole output gradient; the correct backward is the identity).

Kernels are Keras' (in, out) layout. Variables a member holds a slice of carry
``tensor_parallel = True`` (:func:`tensor_parallel_variables`); the rest are whole on every member
of a model group.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from hvdkit._frameworks import require
from hvdkit.core._layout import ParallelLayout, check_divides
from hvdkit.core._layout import make_process_sets as _make_process_sets

tf, hvd = require("tensorflow")

import keras  # noqa: E402  (after tensorflow, which require() imported)

_ids = itertools.count()  # per-process layer numbers, the same on every rank that builds the same model


def make_process_sets(layout: ParallelLayout) -> tuple[Any, Any]:
    """This rank's (model_set, data_set); call before ``hvd.init()`` (see core._layout.make_process_sets)."""
    return _make_process_sets(hvd, layout)


def _size_rank(process_set) -> tuple[int, int]:
    return (1, 0) if process_set is None else (process_set.size(), process_set.rank())


# -- the layer-collective clock -----------------------------------------------------------------------
_CLOCK: list = []  # [tf.Variable(float64)]: seconds spent in layer collectives by this process


def _clock():
    if not _CLOCK:
        with tf.init_scope():  # created eagerly, also when first reached while a tf.function traces
            _CLOCK.append(tf.Variable(0.0, dtype=tf.float64, trainable=False, name="hvdkit_layer_comm_s"))
    return _CLOCK[0]


def layer_comm_seconds() -> float:
    """Cumulative seconds this process spent in the layer collectives (forward and backward)."""
    return float(_clock().numpy()) if _CLOCK else 0.0


def _timed(fn, x):
    """``fn(x)`` with its wall time added to the clock: two ``tf.timestamp`` ops ordered around the
    collective by control dependencies, so it also measures inside compiled steps."""
    if x.dtype == tf.bfloat16:
        # Horovod 0.28 has no bfloat16 collectives (mixed_bfloat16 layers hand them bf16
        # activations): sent as float32, handed back as bfloat16.
        return tf.cast(_timed(fn, tf.cast(x, tf.float32)), tf.bfloat16)
    clock = _clock()
    with tf.control_dependencies([x]):
        t0 = tf.timestamp()
    with tf.control_dependencies([t0]):
        y = fn(tf.identity(x))
    with tf.control_dependencies([y]):
        t1 = tf.timestamp()
    with tf.control_dependencies([clock.assign_add(t1 - t0)]):
        return tf.identity(y)


# -- the collectives, each with its backward ------------------------------------------------------
def _gather_last(x, process_set, name):
    # Horovod concatenates along axis 0: stack a new leading axis, move it next to the features.
    size, _ = _size_rank(process_set)
    stacked = _timed(lambda t: hvd.allgather(t, process_set=process_set, name=name), tf.expand_dims(x, 0))  # (m, ..., k)
    rank = len(x.shape)
    moved = tf.transpose(stacked, [*range(1, rank), 0, rank])  # (..., m, k)
    return tf.reshape(moved, tf.concat([tf.shape(x)[:-1], [size * tf.shape(x)[-1]]], 0))


def _own_slice(x, process_set):
    size, rank = _size_rank(process_set)
    k = tf.shape(x)[-1] // size
    return x[..., rank * k:(rank + 1) * k]


def copy_to_model_parallel(x, process_set, name: str = "tp.copy"):
    """Forward identity; backward allreduce-sum of the input gradient over the model group."""
    if _size_rank(process_set)[0] == 1:
        return x

    @tf.custom_gradient
    def f(x):
        return tf.identity(x), lambda dy: _timed(lambda t: hvd.allreduce(t, op=hvd.Sum, process_set=process_set, name=name), dy)

    return f(x)


def reduce_from_model_parallel(x, process_set, name: str = "tp.reduce"):
    """Forward allreduce-sum of partial sums; backward identity."""
    if _size_rank(process_set)[0] == 1:
        return x

    @tf.custom_gradient
    def f(x):
        return _timed(lambda t: hvd.allreduce(t, op=hvd.Sum, process_set=process_set, name=name), x), lambda dy: tf.identity(dy)

    return f(x)


def gather_from_model_parallel(x, process_set, name: str = "tp.gather"):
    """Forward allgather of the slices along the last axis; backward this member's slice."""
    if _size_rank(process_set)[0] == 1:
        return x

    @tf.custom_gradient
    def f(x):
        return _gather_last(x, process_set, name), lambda dy: _own_slice(dy, process_set)

    return f(x)


def scatter_to_model_parallel(x, process_set, name: str = "tp.scatter"):
    """Forward this member's slice of a whole input; backward allgather of the slices' gradients."""
    if _size_rank(process_set)[0] == 1:
        return x

    @tf.custom_gradient
    def f(x):
        return _own_slice(x, process_set), lambda dy: _gather_last(dy, process_set, name)

    return f(x)


# -- the layers ----------------------------------------------------------------------------------
def _seeds(model_rank: int) -> tuple[int, int]:
    # (slice seed, replicated seed). Python's RNG, which keras.utils.set_random_seed seeds and Keras
    # draws its own default seeds from: the same draw on every rank seeded alike, so replicated
    # variables agree across a model group; the slice seed is offset by the member, so the slices
    # differ as the parts of one unsplit kernel do.
    base = random.randrange(2**30)
    return base + 1 + model_rank, base


def _mark(*variables) -> None:
    for v in variables:
        if v is not None:
            v.tensor_parallel = True


def is_tensor_parallel(v) -> bool:
    """True for a variable this member holds a slice of (the others are whole on every member)."""
    return bool(getattr(v, "tensor_parallel", False))


class _ParallelDense(keras.layers.Layer):
    def __init__(self, in_features: int, out_features: int, process_set, use_bias: bool, tp_name: str | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.process_set = process_set
        self.model_size, self.model_rank = _size_rank(process_set)
        self.tp_name = tp_name or f"tp{next(_ids)}"
        self.slice_seed, self.whole_seed = _seeds(self.model_rank)
        self.bound = 1 / math.sqrt(in_features)  # torch.nn.Linear's init of the whole layer

    def _init(self, seed: int) -> keras.initializers.Initializer:
        return keras.initializers.RandomUniform(-self.bound, self.bound, seed=seed)

    def _gather0(self, t, what: str):
        if self.model_size == 1:
            return tf.identity(t)
        return hvd.allgather(tf.convert_to_tensor(t), process_set=self.process_set, name=f"{self.tp_name}.full.{what}")

    @staticmethod
    def _check_shape(t, shape, what):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"full {what} has shape {tuple(t.shape)}, this layer needs {tuple(shape)}")


class ColumnParallelDense(_ParallelDense):
    """``out_features`` split over the model group: this member's kernel is (in, out // m)."""

    def __init__(self, in_features: int, out_features: int, model_set, gather_output: bool = True, use_bias: bool = True,
                 activation=None, tp_name: str | None = None, what: str | None = None, **kwargs) -> None:
        super().__init__(in_features, out_features, model_set, use_bias, tp_name, **kwargs)
        check_divides(out_features, self.model_size, what or f"a column-parallel layer's output ({in_features} -> {out_features})")
        self.gather_output, self.activation = gather_output, keras.activations.get(activation)
        self.local_out = out_features // self.model_size
        self.kernel = self.add_weight(shape=(in_features, self.local_out), initializer=self._init(self.slice_seed), name="kernel")
        self.bias = self.add_weight(shape=(self.local_out,), initializer=self._init(self.slice_seed + 2**30), name="bias") if use_bias else None
        _mark(self.kernel, self.bias)

    def call(self, x):
        x = copy_to_model_parallel(x, self.process_set, f"{self.tp_name}.copy")
        y = tf.matmul(x, self.kernel)
        if self.bias is not None:
            y = y + self.bias
        y = self.activation(y)  # elementwise: the same on a slice as on the whole
        return gather_from_model_parallel(y, self.process_set, f"{self.tp_name}.gather") if self.gather_output else y

    def load_full(self, kernel, bias=None) -> "ColumnParallelDense":
        """Take this member's columns of the unsplit (in, out) ``kernel`` and its part of ``bias``."""
        self._check_shape(kernel, (self.in_features, self.out_features), "kernel")
        lo, hi = self.model_rank * self.local_out, (self.model_rank + 1) * self.local_out
        self.kernel.assign(tf.convert_to_tensor(kernel)[:, lo:hi])
        if self.bias is not None and bias is not None:
            self._check_shape(bias, (self.out_features,), "bias")
            self.bias.assign(tf.convert_to_tensor(bias)[lo:hi])
        return self

    def full_weights(self) -> dict[str, Any]:
        """The unsplit layer as Dense's {"kernel", "bias"} (a collective of the model group)."""
        out = {"kernel": tf.transpose(self._gather0(tf.transpose(self.kernel), "kernel"))}
        if self.bias is not None:
            out["bias"] = self._gather0(self.bias, "bias")
        return out


class RowParallelDense(_ParallelDense):
    """``in_features`` split over the model group: this member's kernel is (in // m, out)."""

    def __init__(self, in_features: int, out_features: int, model_set, input_is_split: bool = True, use_bias: bool = True,
                 activation=None, tp_name: str | None = None, what: str | None = None, **kwargs) -> None:
        super().__init__(in_features, out_features, model_set, use_bias, tp_name, **kwargs)
        check_divides(in_features, self.model_size, what or f"a row-parallel layer's input ({in_features} -> {out_features})")
        self.input_is_split, self.activation = input_is_split, keras.activations.get(activation)
        self.local_in = in_features // self.model_size
        self.kernel = self.add_weight(shape=(self.local_in, out_features), initializer=self._init(self.slice_seed), name="kernel")
        # Replicated: the same seed on every member.
        self.bias = self.add_weight(shape=(out_features,), initializer=self._init(self.whole_seed), name="bias") if use_bias else None
        _mark(self.kernel)

    def call(self, x):
        if not self.input_is_split:
            x = scatter_to_model_parallel(x, self.process_set, f"{self.tp_name}.scatter")
        y = reduce_from_model_parallel(tf.matmul(x, self.kernel), self.process_set, f"{self.tp_name}.reduce")
        if self.bias is not None:
            y = y + self.bias  # once, after the sum
        return self.activation(y)

    def load_full(self, kernel, bias=None) -> "RowParallelDense":
        """Take this member's rows of the unsplit (in, out) ``kernel``; ``bias`` whole."""
        self._check_shape(kernel, (self.in_features, self.out_features), "kernel")
        lo, hi = self.model_rank * self.local_in, (self.model_rank + 1) * self.local_in
        self.kernel.assign(tf.convert_to_tensor(kernel)[lo:hi])
        if self.bias is not None and bias is not None:
            self._check_shape(bias, (self.out_features,), "bias")
            self.bias.assign(bias)
        return self

    def full_weights(self) -> dict[str, Any]:
        out = {"kernel": self._gather0(self.kernel, "kernel")}
        if self.bias is not None:
            out["bias"] = tf.identity(self.bias)
        return out


class TensorParallelMLP(keras.Model):
    """An MLP of column-then-row pairs (see the torch twin for ``hidden`` / ``layers``).

    ``self.stack`` lists the layers in the order of the unsplit ``keras.Sequential`` of
    ``Dense(h, activation="relu")`` layers (with ``flatten``, a Flatten first, as hvdkit's built-in
    ``mlp``); :meth:`full_weights` / :meth:`load_full_weights` use its indices: ``{"<i>.kernel",
    "<i>.bias"}`` for layer i. An odd last layer stays a whole Dense on every member.
    """

    def __init__(self, in_features: int, hidden: int | Sequence[int], out_features: int, model_set, layers: int | None = None,
                 activation="relu", flatten: bool = False, use_bias: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(hidden, int):
            hidden = [hidden] * (2 * (layers or 1) - 1)
        elif layers is not None:
            raise ValueError("layers= repeats one hidden width; with a list of widths leave it out")
        widths = [in_features, *hidden, out_features]
        n = len(widths) - 1
        stack: list[keras.layers.Layer] = [keras.layers.Flatten()] if flatten else []
        for j in range(n):
            fi, fo, act = widths[j], widths[j + 1], (activation if j < n - 1 else None)
            if j % 2 == 0 and j + 1 < n:
                stack.append(ColumnParallelDense(fi, fo, model_set, gather_output=False, use_bias=use_bias, activation=act,
                                                 what=f"hidden layer {j + 1} of the MLP", dtype=self.dtype_policy))
            elif j % 2 == 1:
                stack.append(RowParallelDense(fi, fo, model_set, input_is_split=True, use_bias=use_bias, activation=act,
                                              what=f"hidden layer {j} of the MLP", dtype=self.dtype_policy))
            else:
                layer = keras.layers.Dense(fo, activation=act, use_bias=use_bias, dtype=self.dtype_policy)
                layer.build((None, fi))
                stack.append(layer)
        self.stack = stack
        self.model_set = model_set

    def call(self, x):
        for layer in self.stack:
            x = layer(x)
        return x

    def full_weights(self) -> dict[str, Any]:
        """The unsplit model's weights, on every member (a collective of the model group)."""
        out: dict[str, Any] = {}
        for i, layer in enumerate(self.stack):
            if isinstance(layer, _ParallelDense):
                out.update({f"{i}.{k}": v for k, v in layer.full_weights().items()})
            elif isinstance(layer, keras.layers.Dense):
                out[f"{i}.kernel"] = tf.identity(layer.kernel)
                if layer.bias is not None:
                    out[f"{i}.bias"] = tf.identity(layer.bias)
        return out

    def load_full_weights(self, weights: dict[str, Any]) -> "TensorParallelMLP":
        """Load this member's slices from the unsplit weights (no collective)."""
        for i, layer in enumerate(self.stack):
            if isinstance(layer, _ParallelDense):
                layer.load_full(weights[f"{i}.kernel"], weights.get(f"{i}.bias"))
            elif isinstance(layer, keras.layers.Dense):
                layer.kernel.assign(weights[f"{i}.kernel"])
                if layer.bias is not None:
                    layer.bias.assign(weights[f"{i}.bias"])
        return self


class ParallelContext:
    """What a Python recipe's ``build_model(..., parallel=ctx)`` gets when ``parallel.model`` > 1:
    ``model_set`` for its :class:`ColumnParallelDense` / :class:`RowParallelDense` layers, the
    ``layout``, this rank's ``model_rank`` and the ``data_set`` (gradient averaging, hvdkit's part)."""

    def __init__(self, layout, model_set, data_set, rank: int) -> None:
        self.layout, self.model_set, self.data_set = layout, model_set, data_set
        self.model = layout.model
        self.model_rank = layout.model_rank(rank)

    def __repr__(self) -> str:
        return f"ParallelContext(model={self.model}, data={self.layout.data}, model_rank={self.model_rank})"


def tensor_parallel_variables(model) -> list:
    """The variables of ``model`` that this member holds a slice of."""
    return [v for v in model.variables if is_tensor_parallel(v)]


def broadcast_variables(model, data_set) -> None:
    """Make every rank start alike: each slice from the first rank of its data-parallel set (the
    ranks holding that slice), each whole variable from global rank 0. (Horovod's ``root_rank``
    with a process set is a *global* rank that must belong to the set.)"""
    split = [v.value for v in model.variables if is_tensor_parallel(v)]
    whole = [v.value for v in model.variables if not is_tensor_parallel(v)]
    if split and data_set is not None and data_set.size() > 1:
        hvd.broadcast_variables(split, root_rank=data_set.ranks[0], process_set=data_set)
    if whole and hvd.size() > 1:
        hvd.broadcast_variables(whole, root_rank=0)


__all__ = [
    "ColumnParallelDense", "ParallelContext", "RowParallelDense", "TensorParallelMLP", "broadcast_variables", "copy_to_model_parallel",
    "gather_from_model_parallel", "is_tensor_parallel", "layer_comm_seconds", "make_process_sets", "reduce_from_model_parallel", "scatter_to_model_parallel",
    "tensor_parallel_variables",
]
