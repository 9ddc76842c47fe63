"""Which rank holds which part of the model: the data x model layout, framework-free.

``size`` ranks form ``data = size // model`` model-parallel groups of ``model`` consecutive ranks
each (2x2: [0, 1] and [2, 3]). The members of a model group each hold one slice of every split
layer and together hold one copy of the model; the layer collectives run inside that group.
Consecutive ranks, because a host's ranks are consecutive under horovodrun and srun: the layer
collectives, one or two per layer pair per step, stay on one host, while gradient averaging, one
grouped allreduce per step, is what crosses hosts.

The data-parallel group of a rank is the ranks at the same position in every model group (2x2:
[0, 2] and [1, 3]): they hold the same slice, see different batch shards, and average their
gradients with each other only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hvdkit.errors import LaunchError, ParallelError


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_divides(width: int, model: int, what: str) -> None:
    """Raise unless ``width`` (a layer's features) splits evenly into ``model`` slices.

    Even slices only: the allgather of a column-parallel layer concatenates equal slices, and
    equal slices keep every member's memory and compute the same (the slowest one paces them all).
    """
    if model < 1:
        raise ParallelError(f"parallel.model={model} is not a positive number of ranks",
                            fix="set parallel.model to 1 (no model parallelism) or more")
    if model > width:
        raise ParallelError(f"parallel.model={model} is larger than {what} ({width} features): a slice would be empty",
                            fix=f"use a parallel.model that divides {width} ({_divisors(width)}) or widen {what}")
    if width % model:
        raise ParallelError(f"{what} ({width} features) does not split into parallel.model={model} equal slices",
                            fix=f"use a parallel.model that divides {width} ({_divisors(width)}) or make {what} a multiple of {model}")


@dataclass(frozen=True)
class ParallelLayout:
    """``size`` ranks as ``data`` model-parallel groups of ``model`` consecutive ranks."""

    size: int
    model: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ParallelError(f"a job of {self.size} ranks cannot be laid out", fix="run with -np 1 or more")
        if self.model < 1:
            raise ParallelError(f"parallel.model={self.model} is not a positive number of ranks",
                                fix="set parallel.model to 1 (no model parallelism) or more")
        if self.size % self.model:
            raise ParallelError(
                f"parallel.model={self.model} does not divide np={self.size}: every model copy needs exactly {self.model} ranks",
                fix=f"run with -np a multiple of {self.model}, or set parallel.model to one of {_divisors(self.size)}",
            )

    @property
    def data(self) -> int:
        """The number of model copies, i.e. the data-parallel degree."""
        return self.size // self.model

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside a job of {self.size} ranks")

    def model_rank(self, rank: int) -> int:
        """Which slice ``rank`` holds (its position in its model group)."""
        self._check(rank)
        return rank % self.model

    def data_rank(self, rank: int) -> int:
        """Which model copy ``rank`` belongs to (its position in its data group)."""
        self._check(rank)
        return rank // self.model

    def model_group(self, rank: int) -> list[int]:
        """The global ranks that together hold ``rank``'s copy of the model."""
        first = self.data_rank(rank) * self.model
        return list(range(first, first + self.model))

    def data_group(self, rank: int) -> list[int]:
        """The global ranks that hold the same slice as ``rank`` (gradient averaging)."""
        return list(range(self.model_rank(rank), self.size, self.model))

    def model_groups(self) -> list[list[int]]:
        return [self.model_group(d * self.model) for d in range(self.data)]

    def data_groups(self) -> list[list[int]]:
        return [self.data_group(m) for m in range(self.model)]

    def process_set_groups(self) -> list[list[int]]:
        """The groups to register as Horovod process sets, in the one order every rank must use.

        A group of all ranks is left out: Horovod refuses a duplicate of its global process set
        (``hvd.init`` raises "is a duplicate"), and the global set already serves it. With
        ``model`` 1 nothing is registered (no layer collectives; gradients average over the global
        set): np single-rank sets would cost a context each at start-up and serve nothing. Otherwise
        single-rank groups are kept (np=2 with model 2: data groups [0] and [1]), so every rank has
        a set for each role and callers need no special case.
        """
        if self.model == 1:
            return []
        return [g for g in self.model_groups() + self.data_groups() if len(g) < self.size]


def check_recipe_layout(recipe: Any, np: int | None, *, elastic: bool = False, custom_model: bool = False,
                        splits_itself: bool = False) -> ParallelLayout | None:
    """Refuse, before any worker starts, a ``parallel.model`` this job or this model cannot use.

    ``np`` is the job's rank count (None: not known yet, only the model is checked). Returns the
    layout, or None when ``parallel.model`` is 1 (nothing is split, nothing to check). Checks:
    ``np`` a multiple of ``parallel.model``; not elastic (a layout is fixed at start, a membership
    change would break every model group); a model hvdkit can split (the built-in MLP, whose
    column-parallel widths ``model.hidden[0], [2], ...`` must each split evenly, see
    ``hvdkit.torch._tensor_parallel.TensorParallelMLP``). ``custom_model``: a Python recipe builds its
    own model and cannot split it (refused); ``splits_itself``: its build_model takes ``parallel``
    (only ``np`` is checked here, its layers check their widths when built).
    """
    model = recipe.parallel.model
    if model == 1:
        return None
    if model < 1:
        raise ParallelError(f"parallel.model={model} is not a positive number of ranks",
                            fix="set parallel.model to 1 (no model parallelism) or more")
    if elastic:
        raise ParallelError(f"parallel.model={model} in an elastic job: model groups are fixed when the job starts "
                            "and a host leaving would break one", fix="run without --elastic/--min-np/--max-np, or set parallel.model=1")
    name = recipe.model.name
    if splits_itself:  # a Python recipe's build_model(..., parallel=ctx) builds its own split layers
        return ParallelLayout(np, model) if np is not None else None
    if custom_model:
        raise ParallelError(f"parallel.model={model}: this Python recipe's build_model takes no `parallel` argument, "
                            "so hvdkit cannot split its model",
                            fix="give build_model a parallel=None parameter and build with ColumnParallelLinear/RowParallelLinear "
                                "(torch) or ColumnParallelDense/RowParallelDense (TensorFlow) on parallel.model_set, "
                                "or set parallel.model=1")
    if name != "mlp":
        raise ParallelError(f"parallel.model={model}: model {name!r} has no tensor-parallel version in hvdkit",
                            fix="use model.name=mlp (the built-in MLP splits its hidden layers), or parallel.model=1")
    hidden = list(recipe.model.hidden)
    # Linear j of [in, *hidden, out] is column-parallel when j is even and not the last one: its
    # output width hidden[j] is split (the row-parallel linear after it takes the same split).
    for j in range(0, len(hidden), 2):
        check_divides(hidden[j], model, f"model.hidden[{j}] (hidden layer {j + 1} of the MLP)")
    layout = ParallelLayout(np, model) if np is not None else None
    return layout


# One registration per (Horovod layer, layout) and process: Horovod refuses a set registered twice.
_REGISTERED: dict[tuple[str, int, int], tuple[Any, Any]] = {}


def make_process_sets(hvd: Any, layout: ParallelLayout) -> tuple[Any, Any]:
    """This rank's (model_set, data_set): Horovod process sets for the layer collectives and for
    gradient averaging (model_set is None when ``layout.model`` is 1). ``hvd`` is ``horovod.torch`` or ``horovod.tensorflow``, handed in by the
    framework layer (this layer never imports Horovod); every rank must call this, in the same order
    relative to its other collectives.

    Before ``hvd.init()`` (preferred) the sets are registered statically by ``hvd.init(process_sets=...)``,
    which the Gloo and the MPI controller both accept; a later plain ``hvd.init()`` is then a no-op.
    ``layout.size`` must then be the job's size (the launcher's, e.g. HOROVOD_SIZE). After
    ``hvd.init()`` they are added with ``hvd.add_process_set``, which Horovod allows only when the job
    started with HOROVOD_DYNAMIC_PROCESS_SETS=1: dynamic sets make the background thread agree on the
    set table in every cycle, so the static way is the default.
    """
    key = (getattr(hvd, "__name__", "hvd"), layout.size, layout.model)
    if key in _REGISTERED:
        return _REGISTERED[key]
    groups = layout.process_set_groups()
    if not hvd.is_initialized():
        sets = [hvd.ProcessSet(g) for g in groups]
        hvd.init(process_sets=sets)
    elif groups:
        if os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "").lower() not in ("1", "true", "yes", "on"):
            raise LaunchError(
                f"Horovod was initialised before the process sets of parallel.model={layout.model} were made, "
                "and adding them later needs dynamic process sets",
                fix="make the process sets before hvd.init() (they are then passed to it), or start the job with "
                "HOROVOD_DYNAMIC_PROCESS_SETS=1",
            )
        sets = [hvd.add_process_set(g) for g in groups]
    else:
        sets = []
    if hvd.size() != layout.size:
        raise LaunchError(f"the layout was made for np={layout.size} but Horovod runs {hvd.size()} ranks",
                          fix="build the ParallelLayout from the job's size (hvd.size(), or HOROVOD_SIZE before hvd.init())")
    rank = hvd.rank()
    by_ranks = {tuple(g): ps for g, ps in zip(groups, sets)}
    # A group not registered is the whole job: Horovod's global set serves it. With model 1 there
    # is no model group to talk to: None, which the tensor-parallel layers read as "not split".
    model_set = None if layout.model == 1 else by_ranks.get(tuple(layout.model_group(rank)), hvd.global_process_set)
    data_set = by_ranks.get(tuple(layout.data_group(rank)), hvd.global_process_set)
    _REGISTERED[key] = (model_set, data_set)
    return model_set, data_set


__all__ = ["ParallelLayout", "check_divides", "check_recipe_layout", "make_process_sets"]
