"""``python -m bench {all,tracking,scaling,ddp,writer,launch,parallelism,system_metrics,outage,slurm} [--quick] [--reps N] [--full]``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time

from bench import _common as C

BENCHES = ("tracking", "scaling", "ddp", "writer", "launch", "parallelism", "system_metrics")
# Not in "all": the outage bench takes ~15 min of its own (each job outlasts a 60 s outage)
# and needs root for PostgreSQL.
EXTRA = ("outage", "slurm")  # slurm: root and the two-node cluster of .ci/slurm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("name", choices=("all", *BENCHES, *EXTRA), help="which bench (all: every one but outage, in order)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, one round")
    ap.add_argument("--reps", type=int, default=None, help="rounds per ratio (default: each bench's own)")
    ap.add_argument("--full", action="store_true",
                    help="also the long variants (writer: the MLflow server with all 512 child runs, ~8 min more)")
    args = ap.parse_args(argv)
    names = BENCHES if args.name == "all" else (args.name,)
    t0 = time.perf_counter()
    C.emit({"bench": "machine", "kind": "machine", **C.machine(), "quick": args.quick})
    failed = []
    for name in names:
        C.note(f"--- {name}{' (quick)' if args.quick else ''}")
        t = time.perf_counter()
        try:
            fn = importlib.import_module(f"bench.{name}").run
            extra = {"full": True} if args.full and "full" in inspect.signature(fn).parameters else {}
            fn(quick=args.quick, reps=args.reps, **extra)
        except C.JobFailed as exc:  # one bench's failure must not hide the others' numbers
            failed.append(name)
            C.emit({"bench": name, "kind": "error", "error": str(exc)})
            C.note(f"{name} failed: {exc}")
        C.emit({"bench": name, "kind": "timing", "wall_s": round(time.perf_counter() - t, 1)})
    C.emit({"bench": "all" if args.name == "all" else args.name, "kind": "timing", "wall_s": round(time.perf_counter() - t0, 1),
            "loadavg": C.machine()["loadavg"]})
    C.print_table()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
