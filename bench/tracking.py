"""Tracking overhead: the same recipe at np=2 without tracking, with hvdkit's tracking, and with
naive per-step ``mlflow.log_metric`` calls on rank 0.

* ``none``   ``hvdkit run ... --no-track``
* ``hvdkit`` ``hvdkit run ...`` into a fresh sqlite store (parent + per-rank child runs, every
  rank's numbers gathered every ``log.every_steps`` and written by rank 0's background writer)
* ``naive``  ``bench.naive_train`` under the same launcher: hvdkit's loop and backend, rank 0
  calling ``mlflow.log_metric`` for 3 metrics every step, synchronously (the integration most
  training scripts have; Accelerate's MLflow tracker measured 0.12 / 0.96 here)

Two designs, both printed:

* jobs: one job per variant, alternated over rounds; throughput is the Summary's measured
  samples/s (each rank's own rate, summed), the ratio paired within a round. End to end, but one
  job's rate varies ~10 % from the next on a shared 2-core VM, more than the cost measured.
* blocks (``bench.tracking_blocks``): one job per recipe running the three variants in adjacent
  blocks of steps, many rounds; the ratio is block against adjacent block, so slow drift cancels.
  This is the one checked against the goal.
"""

from __future__ import annotations

from bench import _common as C

BENCH = "tracking"
VARIANTS = ("none", "hvdkit", "naive")


def cases(quick: bool) -> dict[str, dict]:
    # steps: long enough that a run's rate is not its warm-up, short enough for the 20 min budget.
    # The naive variant is ~10x slower on the fast-step recipe: it runs fewer steps (its rate is
    # per sample, measured the same way; a 300-step run at ~30 ms/step has no warm-up to speak of).
    if quick:
        return {"digits": {"recipe": C.RECIPES / "digits.yaml", "steps": 200, "naive_steps": 60, "blocks": (3, 20, 5),
                           "overrides": ["eval.enabled=false"]}}
    return {
        "digits": {"recipe": C.RECIPES / "digits.yaml", "steps": 1000, "naive_steps": 200, "blocks": (40, 100, 15),
                   "overrides": ["eval.enabled=false"], "what": "fast step (~1-3 ms): MLP [256,128] on digits"},
        # batch 128: ~0.2 s a step here (batch 32 is ~50 ms on this CPU), the slow-step regime.
        "synthetic": {"recipe": C.RECIPES / "synthetic.yaml", "steps": 12, "naive_steps": 12, "blocks": (15, 4, 4),
                      "overrides": ["batch_size=128"], "what": "slow step (~0.2 s): small ResNet, synthetic 32x32, batch 128"},
    }


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    reps = reps or (1 if quick else 4)
    out = []
    for name, case in cases(quick).items():
        r = reps if (quick or name == "digits") else max(3, reps - 1)
        out += _run_case(name, case, r)
        out += _run_blocks(name, case)
    return out


def _run_blocks(name: str, case: dict) -> list[dict]:
    rounds, block, naive_block = case["blocks"]
    with C.TempStore("blocks") as store:
        cmd = C.horovodrun_cmd(2, [C.PY, "-m", "bench.tracking_blocks", str(case["recipe"]), str(rounds), str(block),
                                   str(naive_block), *case["overrides"], *C.QUIET])
        res = C.run_job(cmd, env=C.job_env(MLFLOW_TRACKING_URI=store.uri), what="tracking blocks job")
    ratios, per_step = res.summary["ratios"], res.summary["per_step_s"]
    C.emit({"bench": BENCH, "kind": "measurement", "recipe": name, "variant": "blocks", "rounds": rounds, "block": block,
            "naive_block": naive_block, "per_step_s": per_step, "ratios": ratios,
            "record_step_us_per_step": res.summary["record_step_s_per_step"] * 1e6})
    C.note(f"tracking {name} blocks: hvdkit/none {C.summarize(ratios['hvdkit/none'])['median']:.3f} "
           f"naive/none {C.summarize(ratios['naive/none'])['median']:.3f} over {rounds} rounds of {block} steps")
    return [
        C.result(BENCH, f"{name} hvdkit/none (paired blocks)", ratios["hvdkit/none"], goal=">= 0.99",
                 check=lambda m: m >= 0.99, recipe=name, ratio="hvdkit/none"),
        C.result(BENCH, f"{name} naive/none (paired blocks)", ratios["naive/none"], goal="(reference)", recipe=name,
                 ratio="naive/none"),
        C.result(BENCH, f"{name} record_step us/step (training thread)", [res.summary["record_step_s_per_step"] * 1e6],
                 recipe=name),
    ]


def _run_case(name: str, case: dict, reps: int) -> list[dict]:
    recipe, steps = case["recipe"], case["steps"]
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {"hvdkit/none": [], "naive/none": []}
    writer_share: list[float] = []
    with C.TempStore("tracking") as hv_store, C.TempStore("naive") as naive_store:
        for rnd in range(reps):
            got: dict[str, float] = {}
            for variant in C.rotated(VARIANTS, rnd):
                res = _run_variant(variant, recipe, case, hv_store.uri, naive_store.uri)
                got[variant] = res.samples_per_sec
                rates[variant].append(res.samples_per_sec)
                share = _writer_cpu_share(res) if variant == "hvdkit" else None
                if share is not None:
                    writer_share.append(share)
                C.emit({"bench": BENCH, "kind": "measurement", "recipe": name, "variant": variant, "round": rnd,
                        "np": 2, "steps": case["naive_steps"] if variant == "naive" else steps,
                        "samples_per_sec": res.samples_per_sec, "train_s": res.summary.get("seconds"),
                        "wall_s": round(res.wall_s, 3), "writer_cpu_share": share})
            ratios["hvdkit/none"].append(got["hvdkit"] / got["none"])
            ratios["naive/none"].append(got["naive"] / got["none"])
            C.note(f"tracking {name} round {rnd}: hvdkit/none {ratios['hvdkit/none'][-1]:.3f} "
                   f"naive/none {ratios['naive/none'][-1]:.3f}")
    res = []
    for v in VARIANTS:
        res.append(C.result(BENCH, f"{name} np=2 samples/s [{v}]", rates[v], unit="samples/s", recipe=name, variant=v))
    res.append(C.result(BENCH, f"{name} hvdkit/none (jobs)", ratios["hvdkit/none"], goal="(end to end)",
                        recipe=name, ratio="hvdkit/none"))
    res.append(C.result(BENCH, f"{name} naive/none (jobs)", ratios["naive/none"], goal="(reference)", recipe=name,
                        ratio="naive/none"))
    # Load-independent view of the same cost: CPU seconds of rank 0's writer threads (spool +
    # apply) while training, per second of training. It is what contends with the training thread.
    res.append(C.result(BENCH, f"{name} writer CPU / train time (rank 0)", writer_share, recipe=name))
    return res


def _writer_cpu_share(res: C.JobResult) -> float | None:
    cpu = res.summary.get("thread_cpu_s") or {}
    a, b = cpu.get("train_start") or {}, cpu.get("train_end") or {}
    secs = res.summary.get("seconds") or 0
    if not b or secs <= 0:
        return None
    used = sum(b.get(t, 0.0) - a.get(t, 0.0) for t in ("hvdkit-spool", "hvdkit-apply"))
    return used / secs


def _run_variant(variant: str, recipe, case: dict, hv_uri: str, naive_uri: str) -> C.JobResult:
    if variant == "naive":
        overrides = [*case["overrides"], f"steps={case['naive_steps']}", *C.QUIET]
        cmd = C.horovodrun_cmd(2, [C.PY, "-m", "bench.naive_train", str(recipe), *overrides])
        env = C.job_env(MLFLOW_TRACKING_URI=naive_uri, MLFLOW_EXPERIMENT_NAME="bench-naive")
        return C.run_job(cmd, env=env, what="naive tracking job")
    overrides = [*case["overrides"], f"steps={case['steps']}"]
    cmd = C.hvdkit_cmd(recipe, 2, overrides, track=variant == "hvdkit")
    env = C.job_env(MLFLOW_TRACKING_URI=hv_uri, MLFLOW_EXPERIMENT_NAME="bench-hvdkit")
    return C.run_job(cmd, env=env, what=f"{variant} tracking job")
