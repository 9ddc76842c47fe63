"""Per-rank runner of the paired tracking bench: one job, the three variants in alternating blocks.

Why: a tracking cost of ~1 % cannot be read from separate jobs whose rates differ by ~10 % from
one run to the next on a shared 2-core VM (slow drift: neighbours, frequency). Here one job runs
``rounds`` rounds; each round runs one block of ``block`` steps per variant, in a rotating order,
and the ratio is taken block against adjacent block, so the drift cancels:

* ``none``    training steps only (what ``--no-track`` runs);
* ``hvdkit``  the same steps with hvdkit's ``JobTracker.record_step`` after each (its gathers,
  every ``log_every`` steps, and its writer thread, creating runs and writing to the store);
* ``naive``   the same steps with ``mlflow.log_metric`` of the loss on rank 0 after each step
  (``naive_block`` steps: it is many times slower on a fast step).

The model, data, sharding, optimizer and ``train_step`` are hvdkit's own (``hvdkit.torch``).
Rank 0 writes ``$HVDKIT_SUMMARY_JSON``: per-variant block times and the paired ratios.

    horovodrun -np 2 python -m bench.tracking_blocks RECIPE ROUNDS BLOCK NAIVE_BLOCK [key=value ...]
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    recipe_path, rounds, block, naive_block, overrides = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4:]
    import mlflow

    from hvdkit.core import LRSchedule, ShardedBatches, load_builtin
    from hvdkit.recipe import load_recipe
    from hvdkit.torch import make_backend
    from hvdkit.tracking import TrackingConfig, World, open_job_tracker

    recipe = load_recipe(recipe_path, overrides, framework="torch").recipe
    data = load_builtin(recipe.data, recipe.seed)
    backend = make_backend(recipe, data)
    rank, size = backend.rank, backend.size
    world = World.from_horovod_env(rank, size, backend.gather)
    config = TrackingConfig(experiment="hvdkit-bench", run_name=f"{recipe.name}-blocks", log_every=recipe.log.every_steps)
    tracker = open_job_tracker(config, world, gather=backend.gather, broadcast_object=backend.broadcast_object,
                               gather_async=backend.gather_async)
    tracker.start(params={"bench": "tracking_blocks"}, tags={"hvdkit.recipe": recipe.name})
    naive_run = None
    if rank == 0:  # the naive variant: rank 0 logs every step itself, MLflow's fluent API
        mlflow.set_experiment("hvdkit-bench-naive")
        naive_run = mlflow.start_run(run_name=f"{recipe.name}-naive")

    batches = ShardedBatches(len(data.x_train), recipe.batch_size, rank, size, recipe.seed)
    schedule = LRSchedule(recipe.optimizer.lr, size, recipe.lr_schedule.scale, 0)
    backend.broadcast_state(False)
    epoch, it = 0, batches.epoch(0)

    def next_batch():
        nonlocal epoch, it
        idx = next(it, None)
        if idx is None:
            epoch += 1
            it = batches.epoch(epoch)
            idx = next(it)
        return idx

    tracked_steps = 0
    in_tracker = [0.0]  # seconds the training thread spent inside record_step

    naive_steps = 0

    def run_block(variant: str, n: int) -> float:
        nonlocal tracked_steps, naive_steps
        t_block = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            idx = next_batch()
            batch = backend.batch(idx)
            t1 = time.perf_counter()
            loss, comm = backend.train_step(batch, schedule.at(0))
            t2 = time.perf_counter()
            if variant == "hvdkit":
                tracked_steps += 1
                tracker.record_step(tracked_steps, samples=len(idx), step_time_s=t2 - t1, data_time_s=t1 - t0,
                                    comm_wait_s=comm, loss=loss)
                in_tracker[0] += time.perf_counter() - t2
            elif variant == "naive" and naive_run is not None:
                naive_steps += 1  # rank 0 only: a counter of its own (tracked_steps drives collectives)
                mlflow.log_metric("loss", loss, step=naive_steps)
        return time.perf_counter() - t_block

    variants = ("none", "hvdkit", "naive")
    run_block("none", block)  # warm-up, not counted
    per_step: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(rounds):
        order = variants[rnd % 3:] + variants[:rnd % 3]
        if rnd % 2:
            order = order[::-1]
        for v in order:
            n = naive_block if v == "naive" else block
            per_step[v].append(run_block(v, n) / n)
    tracker.finish("FINISHED")
    if naive_run is not None:
        mlflow.end_run()
    out = os.environ.get("HVDKIT_SUMMARY_JSON")
    if out and rank == 0:
        # rate ratio of a round = none's seconds per step / the variant's (same round: adjacent blocks)
        ratios = {f"{v}/none": [n / x for n, x in zip(per_step["none"], per_step[v])] for v in ("hvdkit", "naive")}
        steps_s = sum(per_step["none"]) * block
        data = {"samples_per_sec": recipe.batch_size * size / (sum(per_step["none"]) / rounds), "seconds": steps_s,
                "per_step_s": per_step, "ratios": ratios, "marks": {},
                "record_step_s_per_step": in_tracker[0] / max(1, rounds * block)}
        tmp = f"{out}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
