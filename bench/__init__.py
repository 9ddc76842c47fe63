"""hvdkit's benchmarks: ``python -m bench NAME [--quick] [--reps N]`` (or ``hvdkit bench NAME``).

Each bench prints one JSON object per line on stdout (``"kind": "measurement"`` for a single
run, ``"kind": "result"`` for a ratio or rate over the repetitions: median, min, max, reps, goal)
and a table at the end. Progress goes to stderr. See docs/benchmarks.md.
"""
