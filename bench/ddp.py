"""Horovod (through hvdkit) against PyTorch DDP: same model, data, batch, threads, np=2, Gloo.

* ``hvdkit``  ``hvdkit run RECIPE -np 2 --no-track`` (Horovod's DistributedOptimizer, Gloo
  controller and CPU ops, default knobs)
* ``ddp``     ``bench.ddp_train``: ``DistributedDataParallel`` with the gloo backend, two
  processes with env initialisation, the same loop structure (see that module)
* ``hvdkit cycle 0.2ms`` (communication-bound case only) ``--cycle-time-ms 0.2``: a gradient
  waits less for Horovod's next coordination round (default 1 ms), which matters at ~1 ms steps.
* ``hvdkit Horovod defaults`` (compute-bound case only) the recipe without its
  ``horovod.cycle_time_ms: 5``: Horovod's 1 ms cycle, whose idle coordination rounds take cores
  from the convolutions (see the scaling bench).

Tracking is off on both sides (its cost is the tracking bench's subject).
"""

from __future__ import annotations

from bench import _common as C

BENCH = "ddp"


def cases(quick: bool) -> dict[str, dict]:
    mlp = ["eval.enabled=false", f"model.hidden={C.MLP136K_HIDDEN}".replace(" ", "")]
    if quick:
        return {"mlp136k": {"recipe": C.RECIPES / "digits.yaml", "overrides": [*mlp, "steps=100"],
                            "variants": ("hvdkit", "ddp")}}
    return {
        "mlp136k": {"recipe": C.RECIPES / "digits.yaml", "overrides": [*mlp, "steps=800"],
                    "variants": ("hvdkit", "ddp", "hvdkit cycle 0.2ms"),
                    "what": f"communication-bound: digits MLP {C.MLP136K_HIDDEN}, {C.mlp_params(64, C.MLP136K_HIDDEN, 10):,} params"},
        "synthetic": {"recipe": C.RECIPES / "synthetic.yaml", "overrides": ["steps=12", "batch_size=128"],
                      "variants": ("hvdkit", "ddp", "hvdkit Horovod defaults"),
                      "what": "compute-bound: small ResNet on synthetic images, batch 128/rank (~0.2 s a step)"},
    }


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    out = []
    for name, case in cases(quick).items():
        r = reps or (1 if quick else 3)
        out += _run_case(name, case, r)
    return out


def _one(variant: str, case: dict) -> C.JobResult:
    if variant == "ddp":
        return C.run_ddp_job(2, case["recipe"], case["overrides"])
    flags = ["--cycle-time-ms", "0.2"] if variant == "hvdkit cycle 0.2ms" else []
    extra = ["horovod.cycle_time_ms=null"] if variant == "hvdkit Horovod defaults" else []
    return C.run_job(C.hvdkit_cmd(case["recipe"], 2, [*case["overrides"], *extra], flags=flags), env=C.job_env(),
                     what=f"{variant} job")


def _run_case(name: str, case: dict, reps: int) -> list[dict]:
    variants = case["variants"]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {f"{v}/ddp": [] for v in variants if v != "ddp"}
    for rnd in range(reps):
        got = {}
        for v in C.rotated(variants, rnd):
            res = _one(v, case)
            got[v] = res.samples_per_sec
            rates[v].append(res.samples_per_sec)
            C.emit({"bench": BENCH, "kind": "measurement", "model": name, "variant": v, "round": rnd, "np": 2,
                    "samples_per_sec": res.samples_per_sec, "train_s": res.summary.get("seconds"),
                    "wall_s": round(res.wall_s, 3)})
        for key in ratios:
            ratios[key].append(got[key.split("/")[0]] / got["ddp"])
        C.note(f"ddp {name} round {rnd}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in ratios.items()))
    out = [C.result(BENCH, f"{name} np=2 samples/s [{v}]", rates[v], unit="samples/s", model=name, variant=v)
           for v in variants]
    for key, vals in ratios.items():
        if key == "hvdkit/ddp":
            out.append(C.result(BENCH, f"{name} hvdkit/ddp", vals, goal=">= 1.0", check=lambda m: m >= 1.0,
                                model=name, ratio=key))
        elif key == "hvdkit Horovod defaults/ddp":
            out.append(C.result(BENCH, f"{name} {key}", vals, goal="(before the fix)", model=name, ratio=key))
        else:
            out.append(C.result(BENCH, f"{name} {key}", vals, goal="(tuned knob)", model=name, ratio=key))
    return out
