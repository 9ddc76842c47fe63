"""Tensor (intra-layer) model parallelism on Horovod process sets, PyTorch.

The members of a model-parallel group (a Horovod process set, see :mod:`hvdkit.core._layout`)
each hold one slice of a layer's weights, as Megatron-LM splits them:

- :class:`ColumnParallelLinear` holds ``out/m`` output features: y_r = x W_r^T + b_r, then, if
  asked, an allgather of the slices (its backward: this member's slice of the output gradient);
- :class:`RowParallelLinear` holds ``in/m`` input features: y = sum_r x_r W_r^T (an allreduce-sum
  of partial sums; its backward: identity, every member already holds the whole output gradient),
  bias added once, after the sum.

A column layer whose output stays split feeding a row layer costs ONE allreduce per pair in the
forward pass and one in the backward pass (the "copy to model parallel region" below: the column
layer's input is the same on every member, each computes only its slice's part of that input's
gradient, and the parts must be summed before they flow further back).

Parameters a member holds a slice of carry ``tensor_parallel = True``; the rest (a row layer's bias,
a replicated layer) are the same on every member of a model group and get the same gradient there.
Gradient averaging therefore runs over the data-parallel set only, for both kinds.

The layers' collectives have fixed names per layer (every rank builds its layers in the same order):
Horovod matches requests across ranks by name, and an unnamed op is named from a per-process handle
counter, which the data-parallel gradient hooks also advance.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from hvdkit._frameworks import require
from hvdkit.core._layout import ParallelLayout, check_divides
from hvdkit.core._layout import make_process_sets as _make_process_sets

torch, hvd = require("torch")

_ids = itertools.count()  # per-process layer numbers, the same on every rank that builds the same model


def make_process_sets(layout: ParallelLayout) -> tuple[Any, Any]:
    """This rank's (model_set, data_set); call before ``hvd.init()`` (see core._layout.make_process_sets)."""
    return _make_process_sets(hvd, layout)


def _size_rank(process_set) -> tuple[int, int]:
    # None: no model parallelism (parallel.model 1), the layers are plain layers.
    return (1, 0) if process_set is None else (process_set.size(), process_set.rank())


# -- time in layer collectives --------------------------------------------------------------------
_comm_s = [0.0]  # this process's seconds inside the layers' collectives (forward and backward)
_comm_bytes = [0]  # and the bytes it handed them (each collective's input tensor): bench/parallelism


def layer_comm_seconds() -> float:
    """Cumulative seconds this process spent in layer collectives (tracking takes per-step deltas)."""
    return _comm_s[0]


def layer_comm_bytes() -> int:
    """Cumulative bytes this process handed to layer collectives (the input of each)."""
    return _comm_bytes[0]


def _timed(fn, *args, **kwargs):
    if args[0].dtype == torch.bfloat16:
        # Horovod 0.28 has no bfloat16 collectives (a bf16 autocast forward hands them bf16
        # activations): sent as float32, handed back as bfloat16.
        return _timed(fn, args[0].float(), *args[1:], **kwargs).to(torch.bfloat16)
    _comm_bytes[0] += args[0].numel() * args[0].element_size()
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        _comm_s[0] += time.perf_counter() - t0


# -- the collectives, as autograd functions ------------------------------------------------------
class _CopyToModelParallel(torch.autograd.Function):
    """Forward identity, backward allreduce-sum of the input gradient over the model group."""

    @staticmethod
    def forward(ctx, x, process_set, name):
        ctx.process_set, ctx.name = process_set, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _timed(hvd.allreduce, grad.contiguous(), op=hvd.Sum, process_set=ctx.process_set, name=ctx.name), None, None


class _ReduceFromModelParallel(torch.autograd.Function):
    """Forward allreduce-sum of partial sums, backward identity (each member needs the whole gradient)."""

    @staticmethod
    def forward(ctx, x, process_set, name):
        return _timed(hvd.allreduce, x.contiguous(), op=hvd.Sum, process_set=process_set, name=name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _gather_last(x, process_set, name):
    # Horovod concatenates along dim 0; stacking a new leading dim and moving it next to the
    # feature dim gives the slices in member order along the last dim.
    size, _ = _size_rank(process_set)
    stacked = _timed(hvd.allgather, x.unsqueeze(0).contiguous(), process_set=process_set, name=name)
    return torch.movedim(stacked, 0, -2).reshape(*x.shape[:-1], size * x.shape[-1])


def _own_slice(x, process_set):
    size, rank = _size_rank(process_set)
    k = x.shape[-1] // size
    return x[..., rank * k:(rank + 1) * k].contiguous()


class _GatherFromModelParallel(torch.autograd.Function):
    """Forward allgather of the slices along the last dim, backward this member's slice."""

    @staticmethod
    def forward(ctx, x, process_set, name):
        ctx.process_set = process_set
        return _gather_last(x, process_set, name)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.process_set), None, None


class _ScatterToModelParallel(torch.autograd.Function):
    """Forward this member's slice of a whole input, backward allgather of the slices' gradients."""

    @staticmethod
    def forward(ctx, x, process_set, name):
        ctx.process_set, ctx.name = process_set, name
        return _own_slice(x, process_set)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.process_set, ctx.name), None, None


def copy_to_model_parallel(x, process_set, name: str = "tp.copy"):
    size, _ = _size_rank(process_set)
    return x if size == 1 else _CopyToModelParallel.apply(x, process_set, name)


def reduce_from_model_parallel(x, process_set, name: str = "tp.reduce"):
    size, _ = _size_rank(process_set)
    return x if size == 1 else _ReduceFromModelParallel.apply(x, process_set, name)


def gather_from_model_parallel(x, process_set, name: str = "tp.gather"):
    size, _ = _size_rank(process_set)
    return x if size == 1 else _GatherFromModelParallel.apply(x, process_set, name)


def scatter_to_model_parallel(x, process_set, name: str = "tp.scatter"):
    size, _ = _size_rank(process_set)
    return x if size == 1 else _ScatterToModelParallel.apply(x, process_set, name)


# -- the layers ----------------------------------------------------------------------------------
def _slice_generator(model_rank: int) -> "torch.Generator":
    # One draw from the global RNG (the same on every rank seeded alike, so the ranks stay in step
    # for the replicated parameters drawn after it), offset by the slice: the members' slices differ
    # from each other as the rows/columns of one unsplit weight do, without building the whole weight.
    base = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(base + model_rank)


def _mark(p: "torch.nn.Parameter") -> "torch.nn.Parameter":
    p.tensor_parallel = True
    return p


class _ParallelLinear(torch.nn.Module):
    def __init__(self, process_set, name: str | None) -> None:
        super().__init__()
        self.process_set = process_set
        self.model_size, self.model_rank = _size_rank(process_set)
        self.tp_name = name or f"tp{next(_ids)}"

    def _gather_dim0(self, t, what: str):
        if self.model_size == 1:
            return t.detach().clone()
        return hvd.allgather(t.detach().contiguous(), process_set=self.process_set, name=f"{self.tp_name}.full.{what}")

    @staticmethod
    def _check_shape(t, shape, what):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"full {what} has shape {tuple(t.shape)}, this layer needs {tuple(shape)}")


class ColumnParallelLinear(_ParallelLinear):
    """``out_features`` split over the model group: this member holds ``out_features // m`` of them."""

    def __init__(self, in_features: int, out_features: int, model_set, gather_output: bool = True, bias: bool = True,
                 dtype=None, name: str | None = None, what: str | None = None) -> None:
        super().__init__(model_set, name)
        check_divides(out_features, self.model_size, what or f"a column-parallel layer's output ({in_features} -> {out_features})")
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.local_out = out_features // self.model_size
        # torch.nn.Linear's init for the whole layer: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        bound = 1 / math.sqrt(in_features)
        gen = _slice_generator(self.model_rank)
        kw = {"dtype": dtype or torch.get_default_dtype()}
        self.weight = _mark(torch.nn.Parameter(torch.empty(self.local_out, in_features, **kw).uniform_(-bound, bound, generator=gen)))
        self.bias = _mark(torch.nn.Parameter(torch.empty(self.local_out, **kw).uniform_(-bound, bound, generator=gen))) if bias else None

    def forward(self, x):
        x = copy_to_model_parallel(x, self.process_set, f"{self.tp_name}.copy")
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return gather_from_model_parallel(y, self.process_set, f"{self.tp_name}.gather") if self.gather_output else y

    @torch.no_grad()
    def load_full_(self, weight, bias=None) -> "ColumnParallelLinear":
        """Take this member's rows of the unsplit (out, in) ``weight`` and its part of ``bias``."""
        self._check_shape(weight, (self.out_features, self.in_features), "weight")
        lo, hi = self.model_rank * self.local_out, (self.model_rank + 1) * self.local_out
        self.weight.copy_(weight[lo:hi])
        if self.bias is not None and bias is not None:
            self._check_shape(bias, (self.out_features,), "bias")
            self.bias.copy_(bias[lo:hi])
        return self

    @torch.no_grad()
    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The unsplit layer as torch.nn.Linear's state dict (a collective of the model group)."""
        out = OrderedDict(weight=self._gather_dim0(self.weight, "weight"))
        if self.bias is not None:
            out["bias"] = self._gather_dim0(self.bias, "bias")
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} ({self.local_out} here), gather_output={self.gather_output}"


class RowParallelLinear(_ParallelLinear):
    """``in_features`` split over the model group: this member holds ``in_features // m`` of them."""

    def __init__(self, in_features: int, out_features: int, model_set, input_is_split: bool = True, bias: bool = True,
                 dtype=None, name: str | None = None, what: str | None = None) -> None:
        super().__init__(model_set, name)
        check_divides(in_features, self.model_size, what or f"a row-parallel layer's input ({in_features} -> {out_features})")
        self.in_features, self.out_features, self.input_is_split = in_features, out_features, input_is_split
        self.local_in = in_features // self.model_size
        bound = 1 / math.sqrt(in_features)  # the whole layer's fan-in, not the slice's
        kw = {"dtype": dtype or torch.get_default_dtype()}
        gen = _slice_generator(self.model_rank)
        self.weight = _mark(torch.nn.Parameter(torch.empty(out_features, self.local_in, **kw).uniform_(-bound, bound, generator=gen)))
        # Replicated: drawn from the global RNG, the same on every member seeded alike.
        self.bias = torch.nn.Parameter(torch.empty(out_features, **kw).uniform_(-bound, bound)) if bias else None

    def forward(self, x):
        if not self.input_is_split:
            x = scatter_to_model_parallel(x, self.process_set, f"{self.tp_name}.scatter")
        y = reduce_from_model_parallel(torch.nn.functional.linear(x, self.weight), self.process_set, f"{self.tp_name}.reduce")
        return y + self.bias if self.bias is not None else y  # once, after the sum

    @torch.no_grad()
    def load_full_(self, weight, bias=None) -> "RowParallelLinear":
        """Take this member's columns of the unsplit (out, in) ``weight``; ``bias`` whole."""
        self._check_shape(weight, (self.out_features, self.in_features), "weight")
        lo, hi = self.model_rank * self.local_in, (self.model_rank + 1) * self.local_in
        self.weight.copy_(weight[:, lo:hi])
        if self.bias is not None and bias is not None:
            self._check_shape(bias, (self.out_features,), "bias")
            self.bias.copy_(bias)
        return self

    @torch.no_grad()
    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict(weight=self._gather_dim0(self.weight.t(), "weight").t().contiguous())
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features} ({self.local_in} here), out={self.out_features}, input_is_split={self.input_is_split}"


class TensorParallelMLP(torch.nn.Sequential):
    """An MLP of column-then-row pairs: one allreduce per pair forward, one per pair backward.

    ``hidden`` is a list of widths (as the recipe's ``model.hidden``), or one width repeated so
    that there are ``layers`` pairs (in -> h -> ... -> h -> out, 2*layers linears). Linear j splits
    by column when j is even and by row when odd; an odd last linear (``hidden: [128, 918]`` has
    three) stays whole on every member: it is the classifier, small, its input is already whole
    after the row layer's sum, and it needs no collective and no divisible width. Children are numbered as the unsplit
    ``torch.nn.Sequential`` (with ``flatten``, as hvdkit's built-in ``mlp``), so
    :meth:`full_state_dict` loads into it and :meth:`load_full_state` takes its state dict.
    """

    def __init__(self, in_features: int, hidden: int | Sequence[int], out_features: int, model_set, layers: int | None = None,
                 activation=torch.nn.ReLU, flatten: bool = False, bias: bool = True, dtype=None) -> None:
        if isinstance(hidden, int):
            hidden = [hidden] * (2 * (layers or 1) - 1)
        elif layers is not None:
            raise ValueError("layers= repeats one hidden width; with a list of widths leave it out")
        widths = [in_features, *hidden, out_features]
        n = len(widths) - 1
        mods: list[torch.nn.Module] = [torch.nn.Flatten()] if flatten else []
        for j in range(n):
            fi, fo = widths[j], widths[j + 1]
            what = f"hidden layer {j + 1} of the MLP"
            if j % 2 == 0 and j + 1 < n:
                mods.append(ColumnParallelLinear(fi, fo, model_set, gather_output=False, bias=bias, dtype=dtype, what=what))
            elif j % 2 == 1:
                mods.append(RowParallelLinear(fi, fo, model_set, input_is_split=True, bias=bias, dtype=dtype, what=f"hidden layer {j} of the MLP"))
            else:
                mods.append(torch.nn.Linear(fi, fo, bias=bias, dtype=dtype))
            if j < n - 1:
                mods.append(activation())
        super().__init__(*mods)
        self.process_set = model_set

    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The unsplit model's state dict, on every member (a collective of the model group)."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, child in self.named_children():
            part = child.full_state_dict() if isinstance(child, _ParallelLinear) else child.state_dict()
            out.update((f"{name}.{k}", v.detach().clone()) for k, v in part.items())
        return out

    def load_full_state(self, state: "dict[str, torch.Tensor]") -> "TensorParallelMLP":
        """Load this member's slices from the unsplit model's state dict (no collective)."""
        for name, child in self.named_children():
            if isinstance(child, _ParallelLinear):
                child.load_full_(state[f"{name}.weight"], state.get(f"{name}.bias"))
            else:
                child.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")})
        return self


def _split_dims(module: "torch.nn.Module") -> list:
    """Per parameter of ``module`` (in ``parameters()`` order, the optimizer's): the dim it is split
    along on this member, with its layer, or None for a whole parameter."""
    out = []
    for _, child in module.named_modules():
        for pname, p in child.named_parameters(recurse=False):
            if isinstance(child, ColumnParallelLinear):
                out.append((p, 0, child, pname))
            elif isinstance(child, RowParallelLinear) and pname == "weight":
                out.append((p, 1, child, pname))
            else:
                out.append((p, None, child, pname))
    params = list(module.parameters())
    assert len(out) == len(params) and all(a[0] is b for a, b in zip(out, params)), "parameter order changed"
    return out


@torch.no_grad()
def full_optimizer_state(module: "torch.nn.Module", state: dict) -> dict:
    """A torch optimizer ``state_dict()`` of the split ``module`` as the unsplit model's (a
    collective of the model group): every per-parameter tensor shaped like its slice is gathered
    along the slice's dim; the rest (step counts, whole parameters' state) is kept as is."""
    dims = _split_dims(module)
    full_state = {}
    for idx in sorted(state["state"]):
        p, dim, layer, pname = dims[idx]
        entry = {}
        for key in sorted(state["state"][idx]):
            t = state["state"][idx][key]
            if dim is not None and torch.is_tensor(t) and tuple(t.shape) == tuple(p.shape) and layer.model_size > 1:
                name = f"{layer.tp_name}.full.opt.{pname}.{key}"
                if dim == 0:
                    t = hvd.allgather(t.detach().contiguous(), process_set=layer.process_set, name=name)
                else:
                    t = hvd.allgather(t.detach().t().contiguous(), process_set=layer.process_set, name=name).t().contiguous()
            elif torch.is_tensor(t):
                t = t.detach().clone()
            entry[key] = t
        full_state[idx] = entry
    return {"state": full_state, "param_groups": state["param_groups"]}


def split_optimizer_state(module: "torch.nn.Module", state: dict) -> dict:
    """The inverse of :func:`full_optimizer_state` (no collective): this member's slices."""
    dims = _split_dims(module)
    out = {}
    for idx, entry in state["state"].items():
        p, dim, layer, _ = dims[int(idx)]
        new = {}
        for key, t in entry.items():
            if dim is not None and torch.is_tensor(t) and t.dim() == p.dim() and t.shape[dim] == p.shape[dim] * layer.model_size:
                k = p.shape[dim]
                t = t.narrow(dim, layer.model_rank * k, k).clone()
            new[key] = t
        out[idx] = new
    return {"state": out, "param_groups": state["param_groups"]}


class ParallelContext:
    """What a Python recipe's ``build_model(..., parallel=ctx)`` gets when ``parallel.model`` > 1:
    ``model_set`` for its :class:`ColumnParallelLinear` / :class:`RowParallelLinear` layers, the
    ``layout``, this rank's ``model_rank`` and the ``data_set`` (gradient averaging, hvdkit's part)."""

    def __init__(self, layout: ParallelLayout, model_set, data_set, rank: int) -> None:
        self.layout, self.model_set, self.data_set = layout, model_set, data_set
        self.model = layout.model
        self.model_rank = layout.model_rank(rank)

    def __repr__(self) -> str:
        return f"ParallelContext(model={self.model}, data={self.layout.data}, model_rank={self.model_rank})"


def _owners(module: "torch.nn.Module") -> dict:
    return {name: child for name, child in module.named_modules() if isinstance(child, _ParallelLinear)}


def full_state_dict(module: "torch.nn.Module") -> "OrderedDict[str, torch.Tensor]":
    """Any module's unsplit state dict (a collective of the model group): its parallel linears
    gathered (as torch.nn.Linear's), everything else as is; the keys of ``module.state_dict()``."""
    owners = _owners(module)
    full = {name: child.full_state_dict() for name, child in owners.items()}  # the same order on every member
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in module.state_dict().items():
        owner, _, attr = key.rpartition(".")
        out[key] = full[owner][attr] if owner in full else value.detach().clone()
    return out


def load_full_state(module: "torch.nn.Module", state: "dict[str, torch.Tensor]") -> "torch.nn.Module":
    """Load this member's slices of an unsplit state dict into any module (no collective)."""
    owners = _owners(module)
    rest = {k: v for k, v in state.items() if k.rpartition(".")[0] not in owners}
    missing, unexpected = module.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in owners]
    if missing or unexpected:
        raise KeyError(f"the unsplit state does not fit this model: missing {missing}, unexpected {unexpected}")
    for name, child in owners.items():
        child.load_full_(state[f"{name}.weight"], state.get(f"{name}.bias"))
    return module


def is_tensor_parallel(p) -> bool:
    """True for a parameter this member holds a slice of (the others are whole on every member)."""
    return bool(getattr(p, "tensor_parallel", False))


@torch.no_grad()
def clip_grad_norm_(module: "torch.nn.Module", max_norm: float, model_set) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for a split model: the norm of the *unsplit* model's
    gradient, i.e. the slices' squared norms summed over the model group (one allreduce of a
    scalar) plus the whole parameters' counted once (their gradients are the same on every member)."""
    grads = [(p.grad, is_tensor_parallel(p)) for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    sq = lambda gs: torch.stack([torch.linalg.vector_norm(g, 2) ** 2 for g in gs]).sum() if gs else torch.zeros(())  # noqa: E731
    sliced = sq([g for g, split in grads if split])
    if model_set is not None and model_set.size() > 1:
        sliced = _timed(hvd.allreduce, sliced, op=hvd.Sum, process_set=model_set, name="tp.clip_norm")
    norm = torch.sqrt(sliced + sq([g for g, split in grads if not split]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch's clip_grad_norm_
    for g, _ in grads:
        g.mul_(coef.to(g.dtype))
    return float(norm)


@torch.no_grad()
def broadcast_parameters(module: "torch.nn.Module", data_set) -> None:
    """Make every rank start alike: each slice from the first rank of its data-parallel set (the
    ranks holding that slice), each whole parameter from global rank 0.

    ``hvd.broadcast_parameters`` cannot do the first: it has no process set, and Horovod's
    ``root_rank`` with a process set is a *global* rank that must belong to the set.
    """
    handles = []
    for name, p in module.named_parameters():
        if is_tensor_parallel(p):
            if data_set is not None and data_set.size() > 1:
                handles.append(hvd.broadcast_async_(p.data, data_set.ranks[0], name=f"tp.bcast.{name}", process_set=data_set))
        elif hvd.size() > 1:
            handles.append(hvd.broadcast_async_(p.data, 0, name=f"tp.bcast.{name}"))
    for h in handles:
        hvd.synchronize(h)


__all__ = [
    "ColumnParallelLinear", "ParallelContext", "RowParallelLinear", "clip_grad_norm_", "full_state_dict", "load_full_state", "TensorParallelMLP", "broadcast_parameters", "copy_to_model_parallel",
    "full_optimizer_state", "gather_from_model_parallel", "is_tensor_parallel", "layer_comm_seconds", "make_process_sets",
    "reduce_from_model_parallel", "split_optimizer_state",
    "scatter_to_model_parallel",
]
