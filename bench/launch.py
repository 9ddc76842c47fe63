"""Launch overhead: ``hvdkit run`` against bare ``horovodrun ... python -m hvdkit.train`` of the
same recipe (np=2, no tracking, a short run), side by side.

Time to first step is rank 0's wall clock at the end of its first optimizer step (written by
``hvdkit.train`` to its ``--summary-json`` file) minus the moment the bench started the launcher;
wall time is launcher start to launcher exit. The phases in between (interpreter up, frameworks
imported, Horovod joined, ...) are reported too, so a regression points at its phase.
"""

from __future__ import annotations

from bench import _common as C

BENCH = "launch"
VARIANTS = ("hvdkit run", "horovodrun")
PHASES = ("process_start", "module_imported", "framework_imported", "backend_ready", "first_step", "train_end",
          "finished")


def _cmd(variant: str, steps: int) -> list[str]:
    recipe = C.RECIPES / "digits.yaml"
    overrides = [f"steps={steps}", "eval.enabled=false"]
    if variant == "hvdkit run":
        return C.hvdkit_cmd(recipe, 2, overrides)
    return [str(C.BIN / "horovodrun"), "-np", "2", "--gloo", C.PY, "-m", "hvdkit.train", str(recipe),
            "--no-track", "--summary-json", C.SUMMARY, *C.QUIET, *overrides]


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    reps = reps or (1 if quick else 3)
    steps = 20 if quick else 50
    first: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    phases: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in VARIANTS}
    r_first, r_wall = [], []
    for rnd in range(reps):
        got = {}
        for variant in C.rotated(VARIANTS, rnd):
            res = C.run_job(_cmd(variant, steps), env=C.job_env(), what=variant)
            got[variant] = res
            first[variant].append(res.marks["first_step"])
            wall[variant].append(res.wall_s)
            for p in PHASES:
                if p in res.marks:
                    phases[variant][p].append(res.marks[p])
            C.emit({"bench": BENCH, "kind": "measurement", "variant": variant, "round": rnd, "np": 2, "steps": steps,
                    "first_step_s": round(res.marks["first_step"], 3), "wall_s": round(res.wall_s, 3),
                    "phases_s": {p: round(res.marks[p], 3) for p in PHASES if p in res.marks},
                    "exit_after_finished_s": round(res.wall_s - res.marks.get("finished", res.wall_s), 3)})
        r_first.append(got["hvdkit run"].marks["first_step"] / got["horovodrun"].marks["first_step"])
        r_wall.append(got["hvdkit run"].wall_s / got["horovodrun"].wall_s)
        C.note(f"launch round {rnd}: first step {got['hvdkit run'].marks['first_step']:.2f}s vs "
               f"{got['horovodrun'].marks['first_step']:.2f}s; wall {got['hvdkit run'].wall_s:.2f}s vs {got['horovodrun'].wall_s:.2f}s")
    out = []
    for v in VARIANTS:
        out.append(C.result(BENCH, f"time to first step [{v}]", first[v], unit="s", variant=v,
                            phases_median_s={p: C.summarize(x)["median"] for p, x in phases[v].items()}))
        out.append(C.result(BENCH, f"wall time [{v}]", wall[v], unit="s", variant=v))
    out.append(C.result(BENCH, "first step hvdkit run/horovodrun", r_first, goal="<= 1.0", check=lambda m: m <= 1.0,
                        ratio="first_step hvdkit/horovodrun"))
    out.append(C.result(BENCH, "wall hvdkit run/horovodrun", r_wall, goal="<= 1.0", check=lambda m: m <= 1.0,
                        ratio="wall hvdkit/horovodrun"))
    return out
