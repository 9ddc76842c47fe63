"""Scaling efficiency E(2) = T(2) / (2 T(1)), np=1 against np=2 with one compute thread per rank.

Two models, each with Horovod's default knobs and with tuned ones:

* compute-bound: recipes/synthetic.yaml (small ResNet) at ``batch_size=128``: ~0.2 s of
  convolutions per step per rank on this machine (batch 32 would be ~50 ms, where the
  ~0.7 MB allreduce already weighs). Tuned: ``--cycle-time-ms 5``: Horovod's background thread
  runs a cross-rank coordination round every cycle, busy or idle, and every one of them takes a
  core from the convolutions (np=2 on 2 cores).
* communication-bound: the digits MLP with hidden ``[128, 918]`` (135,932 parameters: 544 kB of
  gradients against ~1 ms of compute per 32-sample step). Each knob alone, then the best:
  fp16 compression, a shorter cycle, ``backward_passes_per_step=4`` (4 micro-batches of 32 per
  allreduce: ``batch_size=128``, so 4x fewer allreduces per sample; the global batch grows 4x,
  which changes the optimisation; the LR would have to follow).

The cycle time is not varied for the MLP (0.1 to 2.5 ms measured within noise of 1 ms, 5 ms
worse; docs/benchmarks.md). Fusion threshold is not varied either: hvdkit allreduces all gradients as one group per step, far
below the 128 MB default buffer, so the threshold never splits anything here.
"""

from __future__ import annotations

from bench import _common as C

BENCH = "scaling"


def cases(quick: bool) -> dict[str, dict]:
    mlp = ["eval.enabled=false", f"model.hidden={C.MLP136K_HIDDEN}".replace(" ", "")]
    if quick:
        return {"mlp136k": {"recipe": C.RECIPES / "digits.yaml", "base": [*mlp, "steps=100"],
                            "variants": {"np=1": (1, [], []), "np=2 default": (2, [], []),
                                         "np=2 tuned": (2, [], ["horovod.backward_passes_per_step=4", "batch_size=128",
                                                                "steps=25"])},
                            "tuned": "np=2 tuned"}}
    steps = 600
    return {
        "synthetic": {
            "recipe": C.RECIPES / "synthetic.yaml", "base": ["steps=12", "batch_size=128"],
            # the recipe as shipped sets horovod.cycle_time_ms: 5; "Horovod defaults" unsets it
            "variants": {"np=1": (1, [], []), "np=2 Horovod defaults": (2, [], ["horovod.cycle_time_ms=null"]),
                         "np=2 recipe (cycle 5ms)": (2, [], [])},
            "default": "np=2 Horovod defaults", "tuned": "np=2 recipe (cycle 5ms)", "goal": 0.95,
            "what": "compute-bound: ResNet (16 ch, 1 block/stage) on synthetic 32x32, batch 128/rank",
        },
        "mlp136k": {
            "recipe": C.RECIPES / "digits.yaml", "base": [*mlp, f"steps={steps}"],
            "variants": {"np=1": (1, [], []), "np=2 default": (2, [], []),
                         "np=2 fp16": (2, [], ["horovod.compression=fp16"]),
                         "np=2 bpps=4": (2, [], ["horovod.backward_passes_per_step=4", "batch_size=128",
                                                 f"steps={steps // 4}"])},
            "tuned": "np=2 bpps=4",
            "what": f"communication-bound: digits MLP {C.MLP136K_HIDDEN} ({C.mlp_params(64, C.MLP136K_HIDDEN, 10):,} params)",
        },
    }


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    out = []
    for name, case in cases(quick).items():
        out += _run_case(name, case, reps or (1 if quick else 3))
    return out


def _run_case(name: str, case: dict, reps: int) -> list[dict]:
    variants = case["variants"]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    eff: dict[str, list[float]] = {v: [] for v in variants if v != "np=1"}
    for rnd in range(reps):
        got = {}
        for v in C.rotated(list(variants), rnd):
            np_, flags, overrides = variants[v]
            res = C.run_job(C.hvdkit_cmd(case["recipe"], np_, [*case["base"], *overrides], flags=flags),
                            what=f"scaling {name} {v}")
            got[v] = res.samples_per_sec
            rates[v].append(res.samples_per_sec)
            C.emit({"bench": BENCH, "kind": "measurement", "model": name, "variant": v, "round": rnd, "np": np_,
                    "flags": flags, "overrides": overrides, "samples_per_sec": res.samples_per_sec,
                    "train_s": res.summary.get("seconds"), "wall_s": round(res.wall_s, 3)})
        for v in eff:
            eff[v].append(got[v] / (2 * got["np=1"]))
        C.note(f"scaling {name} round {rnd}: " + ", ".join(f"E[{v}] {e[-1]:.3f}" for v, e in eff.items()))
    out = [C.result(BENCH, f"{name} samples/s [{v}]", rates[v], unit="samples/s", model=name, variant=v) for v in variants]
    goal = case.get("goal")
    for v, vals in eff.items():
        tagged = v in (case.get("default", "np=2 default"), case["tuned"])
        out.append(C.result(BENCH, f"{name} E(2) [{v.removeprefix('np=2 ')}]", vals,
                            goal=f">= {goal}" if (goal and tagged) else ("(report)" if tagged else None),
                            check=(lambda m, g=goal: m >= g) if (goal and tagged) else None,
                            model=name, variant=v, ratio="E(2)"))
    return out
