"""The PyTorch backend of the shared loop: Horovod's DistributedOptimizer and broadcasts, wired in."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hvdkit._frameworks import require
from hvdkit.core import ArrayDataset, apply_horovod_knobs, atomic_write, shard_eval
from hvdkit.recipe import Recipe

torch, hvd = require("torch")

from hvdkit.torch import _models  # noqa: E402  (needs torch, imported just above)
from hvdkit.torch._accelerator import accelerator_name, model_device  # noqa: E402


def _optimizer(params, spec) -> "torch.optim.Optimizer":
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


class TorchBackend:
    checkpoint_ext = "pt"

    def __init__(self, recipe: Recipe, data: ArrayDataset, model: "torch.nn.Module | None" = None) -> None:
        apply_horovod_knobs(recipe)  # the recipe's cycle time / fusion threshold, unless set
        hvd.init()  # joins the job horovodrun started (Gloo or MPI)
        self.rank, self.size = hvd.rank(), hvd.size()
        if recipe.threads:
            torch.set_num_threads(recipe.threads)  # one compute thread per rank unless told otherwise
        torch.manual_seed(recipe.seed)
        # Whole arrays become tensors once (NHWC -> NCHW); a batch is then one index op.
        self.x = torch.from_numpy(np.ascontiguousarray(data.x_train.transpose(0, 3, 1, 2)))
        self.y = torch.from_numpy(data.y_train)
        val = shard_eval(len(data.x_val), self.rank, self.size)  # each rank evaluates its slice
        self.x_val = torch.from_numpy(np.ascontiguousarray(data.x_val[val].transpose(0, 3, 1, 2)))
        self.y_val = torch.from_numpy(data.y_val[val])
        self.model = model if model is not None else _models.build(recipe.model, tuple(self.x.shape[1:]), data.num_classes)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        # The GPU this rank trains on (its name), or None on the CPU: reported to tracking.
        self.accelerator: str | None = accelerator_name(model_device(self.model))
        self.passes = recipe.horovod.backward_passes_per_step
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
            groups=None if os.environ.get("HOROVOD_ELASTIC") == "1" else 1,
        )

    # -- the loop's contract -------------------------------------------------------------
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
            loss = self.loss_fn(self.model(xs), ys) / self.passes
            loss.backward()
            total += loss.item()
        t0 = time.perf_counter()
        # Horovod's own spinning synchronize(): measured faster than a sleeping poll once there is
        # one grouped allreduce per step (docs/benchmarks.md).
        self.optimizer.synchronize()
        comm = time.perf_counter() - t0
        with self.optimizer.skip_synchronize():
            self.optimizer.step()  # θ ← θ − η·g with g = (1/p) Σ g_i
        return total, comm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out = self.model(self.x_val) if len(self.x_val) else torch.empty(0, 1)
        loss_sum = torch.nn.functional.cross_entropy(out, self.y_val, reduction="sum").item() if len(self.x_val) else 0.0
        correct = (out.argmax(1) == self.y_val).sum().item() if len(self.x_val) else 0
        # Sum counts over ranks so uneven shards weigh by sample count.
        tot = self.allreduce_sum(np.array([loss_sum, correct, len(self.y_val)], dtype=np.float64))
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
        # Optimizer state only when resuming: a fresh optimizer is identical everywhere, and
        # Horovod initialises empty state by a zero-gradient step, which weight decay would turn
        # into a real update.
        if resumed:
            hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)

    def save_checkpoint(self, path: Path, meta: dict) -> None:
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "meta": meta}, buf)
        atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))

    def load_checkpoint(self, path: Path) -> dict:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["meta"]
