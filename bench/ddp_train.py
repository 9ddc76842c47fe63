"""Per-rank runner of the DDP side of the ddp bench: ``torch.nn.parallel.DistributedDataParallel``
with the gloo backend, everything else as in hvdkit's PyTorch backend and loop.

Same recipe file and overrides as ``hvdkit run``, same data (hvdkit's loaders, same seed), same
sharding (``ShardedBatches``), same model builder, optimizer, LR schedule and thread count; the
loop has the same structure (LR set per step, zero_grad, forward, backward, ``loss.item()``,
step) and throughput is measured the same way: each rank's samples / training seconds, summed
over ranks. Environment initialisation (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE``), as torchrun would set it; the bench starts the processes itself.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python -m bench.ddp_train RECIPE [key=value ...]
"""

from __future__ import annotations

import math
import os
import sys
import time


def main(argv: list[str]) -> int:
    marks = {"module_imported": time.time()}
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hvdkit.core import LRSchedule, ShardedBatches, load_builtin, plan_steps
    from hvdkit.core.loop import Summary
    from hvdkit.recipe import load_recipe
    from hvdkit.torch import _models
    from hvdkit.train import _write_summary_json

    recipe = load_recipe(argv[0], argv[1:], framework="torch").recipe
    dist.init_process_group("gloo", init_method="env://")
    rank, size = dist.get_rank(), dist.get_world_size()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    data = load_builtin(recipe.data, recipe.seed)
    x = torch.from_numpy(np.ascontiguousarray(data.x_train.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(data.y_train)
    model = _models.build(recipe.model, tuple(x.shape[1:]), data.num_classes)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters and buffers
    spec = recipe.optimizer
    if spec.name == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    elif spec.name == "adam":
        opt = torch.optim.Adam(ddp.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        opt = torch.optim.AdamW(ddp.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = ShardedBatches(len(data.x_train), recipe.batch_size, rank, size, recipe.seed)
    epochs, total_steps = plan_steps(recipe, batches.steps_per_epoch)
    schedule = LRSchedule(recipe.optimizer.lr, size, recipe.lr_schedule.scale,
                          round(recipe.lr_schedule.warmup_epochs * batches.steps_per_epoch))
    marks["backend_ready"] = time.time()

    step, samples, loss_v = 0, 0, math.nan
    t_train = time.perf_counter()
    for epoch in range(epochs):
        it = batches.epoch(epoch)
        while step < total_steps:
            idx = next(it, None)
            if idx is None:
                break
            ti = torch.from_numpy(idx)
            xb, yb = x[ti], y[ti]
            for group in opt.param_groups:
                group["lr"] = schedule.at(step)
            ddp.train()
            opt.zero_grad()
            loss = loss_fn(ddp(xb), yb)
            loss.backward()  # DDP's reducer allreduces gradient buckets as they become ready
            loss_v = loss.item()
            opt.step()
            step += 1
            samples += len(idx)
            if step == 1:
                marks["first_step"] = time.time()
        if step >= total_steps:
            break
    elapsed = time.perf_counter() - t_train
    marks["train_end"] = time.time()
    totals = torch.tensor([samples / elapsed, loss_v], dtype=torch.float64)
    dist.all_reduce(totals)
    summary = Summary(epochs=epoch + 1, steps=step, loss=float(totals[1] / size), samples_per_sec=float(totals[0]),
                      seconds=elapsed)
    out = os.environ.get("HVDKIT_SUMMARY_JSON")
    if out and rank == 0:
        marks["finished"] = time.time()
        _write_summary_json(out, summary, recipe, size, marks)
    # Leave together and skip the interpreter's teardown (as hvdkit.train does): a rank that
    # tears ProcessGroupGloo down while its peer is already gone can abort in a C++ destructor
    # ("terminate called without an active exception"), which says nothing about the training.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
