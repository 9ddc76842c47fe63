"""System metrics overhead: tracked digits np=2 jobs with one sampler per host every 1 s
(``log.system_metrics_interval_s=1``) against the same job with sampling off (``=0``), jobs
alternated (the order rotates each round), the ratio of the medians of their training
``samples_per_sec`` (rank 0's ``--summary-json``).

Separate jobs on a shared 2-core machine differ by several percent from run to run, more than a
sampler costs, so the bench also times what the sampler adds directly: one ``HostSampler.sample()``
(psutil, and NVML where present) on this process, as a fraction of the interval (the share of one
core the sampler thread takes, off the training thread).
"""

from __future__ import annotations

import time

from bench import _common as C

BENCH = "system_metrics"
VARIANTS = ("sampling 1 s", "off")
INTERVAL = {"sampling 1 s": "1", "off": "0"}
GOAL = ">= 0.99"  # the tracking goal (docs/benchmarks.md): within 1 % of the job without it


def _sample_cost_s(n: int) -> float:
    """Median seconds of one sample, on a sampler whose own thread is idle (interval 1 h)."""
    import statistics

    from hvdkit.tracking._system import HostSampler

    sampler = HostSampler(3600.0)
    try:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            sampler.sample()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        sampler.close()


def run(quick: bool = False, reps: int | None = None) -> list[dict]:
    reps = reps or (1 if quick else 3)
    steps = 200 if quick else 1500  # ~4 s / ~25 s of training at np=2: 4 / 25 samples a job
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with C.TempStore("sysmetrics") as store:
        for rnd in range(reps):
            for variant in C.rotated(VARIANTS, rnd):
                cmd = C.hvdkit_cmd(C.RECIPES / "digits.yaml", 2, [f"steps={steps}", "eval.enabled=false",
                                                                  f"log.system_metrics_interval_s={INTERVAL[variant]}"],
                                   track=True)
                res = C.run_job(cmd, env=C.job_env(MLFLOW_TRACKING_URI=store.uri), what=variant)
                rates[variant].append(res.samples_per_sec)
                C.emit({"bench": BENCH, "kind": "measurement", "variant": variant, "round": rnd, "np": 2,
                        "steps": steps, "samples_per_sec": round(res.samples_per_sec, 1), "wall_s": round(res.wall_s, 2)})
            C.note(f"system metrics round {rnd}: " + ", ".join(f"{v} {rates[v][-1]:,.0f}/s" for v in VARIANTS))
    on, off = (C.summarize(rates[v])["median"] for v in VARIANTS)
    out = [C.result(BENCH, f"samples/s [{v}]", rates[v], unit="samples/s", variant=v) for v in VARIANTS]
    ratio = on / off if on and off else None
    out.append(C.result(BENCH, "sampling 1 s / off, median of jobs", [ratio] if ratio else [], goal=GOAL,
                        check=lambda m: m >= 0.99, ratio="median(sampling 1 s) / median(off)"))
    cost = _sample_cost_s(5 if quick else 50)
    out.append(C.result(BENCH, "one sample (psutil / NVML), µs", [cost * 1e6], unit="µs"))
    out.append(C.result(BENCH, "sampler thread / one core at 1 s", [cost / 1.0], goal="<= 0.001",
                        check=lambda m: m <= 0.001))
    return out


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main(["system_metrics", *sys.argv[1:]]))
