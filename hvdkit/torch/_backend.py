"""The PyTorch backend of the shared loop: Horovod's DistributedOptimizer and broadcasts, wired in."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit.core import ArrayDataset, apply_horovod_knobs, atomic_write, shard_eval
from hvdkit.core.data import DataSplits
from hvdkit.core._layout import ParallelLayout
from hvdkit.errors import ParallelError
from hvdkit.recipe import Recipe

torch, hvd = require("torch")

from hvdkit.torch import _data, _models  # noqa: E402  (needs torch, imported just above)
from hvdkit.torch import _tensor_parallel as tp  # noqa: E402
from hvdkit.torch._accelerator import accelerator_name, model_device  # noqa: E402


def _optimizer(params, spec) -> "torch.optim.Optimizer":
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


class TorchBackend:
    checkpoint_ext = "pt"

    def __init__(self, recipe: Recipe, data: ArrayDataset | DataSplits, model: "torch.nn.Module | None" = None) -> None:
        apply_horovod_knobs(recipe)  # the recipe's cycle time / fusion threshold, unless set
        split = recipe.parallel.model > 1
        self.model_set = self.data_set = None
        if split:
            if os.environ.get("HOROVOD_ELASTIC") == "1":
                raise ParallelError(f"parallel.model={recipe.parallel.model} in an elastic job",
                                    fix="run without elastic options, or set parallel.model=1")
            if model is not None and not callable_factory(model):
                raise ParallelError(f"parallel.model={recipe.parallel.model}: this Python recipe's build_model takes no "
                                    "`parallel` argument, so its model cannot be split",
                                    fix="give build_model a parallel=None parameter and build with "
                                        "ColumnParallelLinear/RowParallelLinear(parallel.model_set), or set parallel.model=1")
            # The process sets are registered by hvd.init itself (Horovod 0.28's static sets):
            # the layout needs the job's size before init, from the launcher.
            size = _launcher_size()
            self.layout = ParallelLayout(size, recipe.parallel.model)
            self.model_set, self.data_set = tp.make_process_sets(self.layout)  # calls hvd.init(process_sets=...)
        else:
            hvd.init()  # joins the job horovodrun started (Gloo or MPI)
        self.rank, self.size = hvd.rank(), hvd.size()
        if not split:
            self.layout = ParallelLayout(self.size, 1)
        self.split = split
        # Members of a model group see the same samples: data shards are per model copy.
        self.data_rank, self.data_size = self.layout.data_rank(self.rank), self.layout.data
        if recipe.threads:
            torch.set_num_threads(recipe.threads)  # one compute thread per rank unless told otherwise
        torch.manual_seed(recipe.seed)
        self.recipe, self.data = recipe, data
        self.streamed = isinstance(data, DataSplits)  # a shard folder or the recipe's own Dataset
        if self.streamed:
            self.x = self.y = self.x_val = self.y_val = None
            input_shape = _data.model_input_shape(data)
        else:
            # Whole arrays become tensors once (NHWC -> NCHW); a batch is then one index op.
            self.x = torch.from_numpy(np.ascontiguousarray(data.x_train.transpose(0, 3, 1, 2)))
            self.y = torch.from_numpy(data.y_train)
            # Each model copy evaluates its slice (a split model's forward pass is a collective of its
            # group: the members must see the same inputs); the global sums then count every sample
            # `model` times, which the loss and accuracy ratios do not see.
            val = shard_eval(len(data.x_val), self.data_rank, self.data_size)
            self.x_val = torch.from_numpy(np.ascontiguousarray(data.x_val[val].transpose(0, 3, 1, 2)))
            self.y_val = torch.from_numpy(data.y_val[val])
            input_shape = tuple(self.x.shape[1:])
        if split and model is not None:
            # A Python recipe's own split model: built now that its process sets exist.
            model = model(tp.ParallelContext(self.layout, self.model_set, self.data_set, self.rank))
        if split and model is not None:
            self.model = model
        elif split:
            if recipe.model.name != "mlp":
                raise ParallelError(f"parallel.model={recipe.parallel.model}: model {recipe.model.name!r} cannot be split",
                                    fix="use model.name=mlp, or parallel.model=1")
            # Same seed on every rank (torch.manual_seed above): the replicated parameters agree,
            # each slice is drawn from a generator offset by the member's position.
            self.model = tp.TensorParallelMLP(int(np.prod(input_shape)), list(recipe.model.hidden), data.num_classes,
                                              self.model_set, flatten=True)
        else:
            self.model = model if model is not None else _models.build(recipe.model, input_shape, data.num_classes)
        self._full_state: dict | None = None  # a split job's gathered checkpoint state (prepare/load)
        # Training loss; evaluation stays plain cross-entropy.
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        # The GPU this rank trains on (its name), or None on the CPU: reported to tracking.
        self.accelerator: str | None = accelerator_name(model_device(self.model))
        self.passes = recipe.horovod.backward_passes_per_step
        self.clip_norm = recipe.optimizer.clip_norm
        # bf16: forward passes under autocast (weights, gradients and their allreduce stay fp32).
        # fp32 enters no autocast context at all: nothing added to each step.
        device = model_device(self.model).type
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision)
        self.autocast = functools.partial(torch.autocast, device, dtype=half) if half else contextlib.nullcontext
        # fp16: float16's 5-bit exponent underflows small gradients; the loss is scaled up before
        # backward and the averaged gradients scaled back before the step (Horovod's AMP recipe).
        self.scaler = torch.amp.GradScaler(device) if recipe.precision == "fp16" else None
        compression = hvd.Compression.fp16 if recipe.horovod.compression == "fp16" else hvd.Compression.none
        # Averages g_i over ranks in background allreduces that start as each gradient is ready.
        self.optimizer = hvd.DistributedOptimizer(
            _optimizer(self.model.parameters(), recipe.optimizer),
            named_parameters=self.model.named_parameters(),
            compression=compression,
            backward_passes_per_step=self.passes,
            op=hvd.Average,
            # One grouped allreduce of every gradient per step, like DDP's single bucket for a
            # small model: per-gradient allreduces, each picked up by whichever 1 ms Horovod cycle
            # is running when its hook fires, cost a synchronisation of the ranks each and buy no
            # overlap on a CPU whose cores all compute (bench/ddp: synthetic ResNet hvdkit/DDP
            # 0.72 -> 0.87, np=2 on 2 cores). Unused parameters are still allreduced, singly, by
            # synchronize(). Not in an elastic job: grouping broadcasts the parameter order from
            # rank 0 right here, a collective a joining worker may not run before hvd.elastic.run.
            # Split: averaging over the data-parallel set only (the ranks holding the same slice).
            # Horovod's grouped path broadcasts from global rank 0, which a set without it lacks
            # ("invalid root rank"): per-gradient allreduces there.
            groups=None if split or os.environ.get("HOROVOD_ELASTIC") == "1" else 1,
            **({"process_set": self.data_set} if split else {}),
        )

    # -- model parallelism -----------------------------------------------------------------
    def parameters_local(self) -> int:
        """This rank's parameter count (its slices plus the whole parameters it holds)."""
        return int(sum(p.numel() for p in self.model.parameters()))

    def comm_bytes(self) -> dict[str, int]:
        """What this rank hands to collectives: the gradients it averages each step (0 when it is
        the only holder of its slice) and the layer collectives' bytes so far (bench/parallelism)."""
        grads = sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.layout.data > 1 else 0
        return {"gradient_per_step": int(grads), "layer_total": tp.layer_comm_bytes() if self.split else 0}

    @property
    def layer_comm_s(self) -> float:
        """Seconds this process spent in layer collectives (0.0 when the model is not split)."""
        return tp.layer_comm_seconds() if self.split else 0.0

    def replica_digest(self) -> np.ndarray:
        """[sum, sum of squares] of this rank's parameters in float64 (hvdkit.core.loop.replicas_agree)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])
        return np.array([flat.sum().item(), (flat * flat).sum().item()])

    def log_model(self, run_id: str, **kwargs: Any) -> Any:
        """Rank 0, a FINISHED job: the trained model on the parent run ``run_id`` with MLflow's
        flavour (hvdkit.tracking._logged_model calls it, duck-typed, with the store set)."""
        from hvdkit.torch._log_model import log_model

        return log_model(self, run_id, **kwargs)

    # -- the loop's contract -------------------------------------------------------------
    def train_feed(self, recipe: Recipe, data_rank: int, data_size: int):
        """Streamed data's batches (read ahead); None: the loop cuts the in-memory arrays by ``batch``."""
        return _data.train_feed(self.data, recipe, data_rank, data_size) if self.streamed else None

    def _val_batches(self):
        if self.streamed:
            return _data.val_batches(self.data, self.recipe, self.data_rank, self.data_size)
        return iter([(self.x_val, self.y_val)] if len(self.x_val) else [])

    def batch(self, indices: np.ndarray) -> Any:
        idx = torch.from_numpy(indices)
        return self.x[idx], self.y[idx]

    def train_step(self, batch: Any, lr: float) -> tuple[float, float]:
        x, y = batch
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad()
        total = 0.0
        # backward_passes_per_step: accumulate k micro-batch gradients locally, allreduce once.
        for xs, ys in zip(x.chunk(self.passes), y.chunk(self.passes)):
            with self.autocast():
                out = self.model(xs)
            loss = self.loss_fn(out.float(), ys) / self.passes
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        t0 = time.perf_counter()
        # Horovod's own spinning synchronize(): measured faster than a sleeping poll once there is
        # one grouped allreduce per step (docs/benchmarks.md).
        self.optimizer.synchronize()
        comm = time.perf_counter() - t0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the averaged gradients: every rank finds the same inf/NaN
        if self.clip_norm is not None and self.split:  # the unsplit model's norm, over the model group
            tp.clip_grad_norm_(self.model, self.clip_norm, self.model_set)
        elif self.clip_norm is not None:  # after the allreduce: every rank clips the same averaged g
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        with self.optimizer.skip_synchronize():
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skipped, on every rank alike, when a gradient overflowed
                self.scaler.update()
            else:
                self.optimizer.step()  # θ ← θ − η·g with g = (1/p) Σ g_i
        return total, comm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for x, y in self._val_batches():
            with self.autocast():
                out = self.model(x).float()
            loss_sum += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += len(y)
        # Sum counts over ranks so uneven shards weigh by sample count.
        tot = self.allreduce_sum(np.array([loss_sum, correct, count], dtype=np.float64))
        return {"val_loss": float(tot[0] / tot[2]), "val_accuracy": float(tot[1] / tot[2])}

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        handle = hvd.allreduce_async(torch.from_numpy(values), op=hvd.Sum, name="hvdkit.sum")
        return self._result(handle).numpy()

    def gather(self, vector: np.ndarray) -> np.ndarray:
        # The tracker's gather (a collective), every log_every steps; waited for like the gradients.
        return self.gather_async(vector)()

    def gather_async(self, vector: np.ndarray):
        """Start the tracker's allgather; returns a function that waits for the ``[size, k]`` table."""
        handle = hvd.allgather_async(torch.from_numpy(vector[None, :]), name="hvdkit.gather")
        wait = lambda: self._result(handle).numpy()  # noqa: E731
        # Lets a failing job keep a gather that completed before a peer died (tracker.finish).
        wait.done = lambda: hvd.poll(handle)
        return wait

    def _result(self, handle: int) -> "torch.Tensor":
        return hvd.synchronize(handle)

    def broadcast_object(self, obj: Any) -> Any:
        # A fixed name: Horovod's default is the object's type name, which differs between
        # rank 0's value and the other ranks' placeholder, and the ranks would never match up.
        return hvd.broadcast_object(obj, root_rank=0, name="hvdkit.object")

    def broadcast_state(self, resumed: bool) -> None:
        if self.split:
            if resumed:
                # Rank 0 read the unsplit checkpoint (load_checkpoint); every rank takes its slices.
                full = hvd.broadcast_object(self._full_state, root_rank=0, name="hvdkit.tp.resume")
                self._full_state = None
                tp.load_full_state(self.model, full["model"])
                self.optimizer.load_state_dict(tp.split_optimizer_state(self.model, full["optimizer"]))
            tp.broadcast_parameters(self.model, self.data_set)
            return
        # Optimizer state only when resuming: a fresh optimizer is identical everywhere, and
        # Horovod initialises empty state by a zero-gradient step, which weight decay would turn
        # into a real update.
        if resumed:
            hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
            if self.scaler is not None:
                # One loss scale everywhere: the ranks' scaled gradients are averaged together.
                self.scaler.load_state_dict(hvd.broadcast_object(self.scaler.state_dict(), root_rank=0,
                                                                 name="hvdkit.scaler"))
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)

    def prepare_checkpoint(self) -> None:
        """Every rank, before rank 0's save_checkpoint: a split model gathers its unsplit state
        (model and optimizer, as the plain model's) over its model group (a collective)."""
        if self.split:
            self._full_state = {"model": tp.full_state_dict(self.model),
                                "optimizer": tp.full_optimizer_state(self.model, self.optimizer.state_dict())}

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        buf = io.BytesIO()
        if self.split:
            # The unsplit model (keys of hvdkit's plain mlp) and optimizer: loads into the plain
            # model, and a split job of any parallel.model resumes from it.
            assert self._full_state is not None, "prepare_checkpoint() must run on every rank first"
            state, self._full_state = self._full_state, None
            meta = {**meta, "parallel_model": self.layout.model}
        else:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()  # a resumed job continues with the same loss scale
        torch.save({**state, "meta": meta}, buf)
        atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))

    def load_checkpoint(self, path: Path) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if self.split:
            self._full_state = {"model": state["model"], "optimizer": state["optimizer"]}  # split in broadcast_state
            return state["meta"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return state["meta"]


def callable_factory(model: Any) -> bool:
    """A model factory (``parallel -> module``) rather than a built module: a Python recipe's split model."""
    return callable(model) and not isinstance(model, torch.nn.Module)


def _launcher_size() -> int:
    """The job's size before hvd.init: horovodrun (Gloo) sets HOROVOD_SIZE, MPI launchers their own."""
    for var in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1
