"""Data parallel vs model parallel vs hybrid: what splitting the model buys and what it costs.

The founding question: when does model parallelism pay off? One wide MLP (digits, hidden
``[4096, 4096]``: 17.1 M parameters, 68 MB of fp32 gradients a step), torch, trained by
``hvdkit run`` in five layouts, alternated over rounds:

* np=2: data parallel (2 full copies) and model parallel (1 copy split in 2);
* np=4: data parallel (4 copies), hybrid 2x2 (2 copies, each split in 2), model parallel (1 copy in 4).

Per layout: samples/s (the job's summary: each sample counted once, whatever the split), bytes
each rank hands to collectives per step (counted by the backend: the gradients it averages over
its data-parallel group, 0 when it alone holds its slice, plus the split layers' collectives), and
from the MLflow child runs: parameters per rank and peak RSS per rank. Every job is an MLflow run
(experiment ``hvdkit-bench-parallelism``) in ``$MLFLOW_TRACKING_URI``, else ``./hvdkit-bench.db``:
open it with ``hvdkit ui`` to compare them. Evaluation is off, so the counted bytes are training's.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import _common as C

BENCH = "parallelism"
EXPERIMENT = "hvdkit-bench-parallelism"

# (np, parallel.model) per layout, in table order.
LAYOUTS = {
    "np=2 data": (2, 1),
    "np=2 model": (2, 2),
    "np=4 data": (4, 1),
    "np=4 hybrid 2x2": (4, 2),
    "np=4 model": (4, 4),
}


def _store_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'hvdkit-bench.db'}"


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    hidden, steps = ("[64,64]", 10) if quick else ("[4096,4096]", 30)
    layouts = {k: v for k, v in LAYOUTS.items() if not quick or v[0] == 2}
    reps = reps or (1 if quick else 2)
    uri = _store_uri()
    base = [f"model.hidden={hidden}", f"steps={steps}", "eval.enabled=false", "log.every_steps=5"]
    got: dict[str, dict[str, list[float]]] = {k: {} for k in layouts}
    for rnd in range(reps):
        for name in C.rotated(list(layouts), rnd):
            np_, model = layouts[name]
            env = C.job_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=EXPERIMENT)
            res = C.run_job(C.hvdkit_cmd(C.RECIPES / "digits.yaml", np_, [*base, f"parallel.model={model}"], track=True),
                            env=env, what=f"parallelism {name}")
            comm = res.summary.get("comm_bytes") or {}
            done = max(1, int(res.summary.get("steps") or steps))
            per_rank = _per_rank(uri)
            m = {
                "samples_per_sec": res.samples_per_sec,
                "gradient_mb_per_step": comm.get("gradient_per_step", 0) / 1e6,
                "layer_mb_per_step": comm.get("layer_total", 0) / done / 1e6,
                "parameters_per_rank_m": per_rank.get("parameters", float("nan")) / 1e6,
                "peak_rss_mb_per_rank": per_rank.get("peak_rss_mb", float("nan")),
            }
            for k, v in m.items():
                got[name].setdefault(k, []).append(v)
            C.emit({"bench": BENCH, "kind": "measurement", "layout": name, "np": np_, "model": model, "round": rnd,
                    "hidden": hidden, "steps": done, **m})
    out = []
    for name, vals in got.items():
        for key, unit in (("samples_per_sec", "samples/s"), ("gradient_mb_per_step", "MB"), ("layer_mb_per_step", "MB"),
                          ("parameters_per_rank_m", "M"), ("peak_rss_mb_per_rank", "MiB")):
            out.append(C.result(BENCH, f"{name}: {key}", vals[key], unit=unit, layout=name))
    C.note(f"parallelism runs in {uri}, experiment {EXPERIMENT}")
    return out


def _per_rank(uri: str) -> dict[str, float]:
    """The newest job's largest per-rank ``parameters`` and ``peak_rss_mb`` (its child runs)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    parents = client.search_runs([exp.experiment_id], "tags.`hvdkit.role` = 'parent'", order_by=["start_time DESC"],
                                 max_results=1)
    if not parents:
        return {}
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    out: dict[str, float] = {}
    for key in ("parameters", "peak_rss_mb"):
        values = [c.data.metrics[key] for c in children if key in c.data.metrics]
        if values:
            out[key] = max(values)
    return out
