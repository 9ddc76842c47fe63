"""One per-file time table over the passes of ``make test``: ``python tests/_durations.py [LABEL=]FILE...``.

Each FILE is the JSON a pass wrote to ``$HVDKIT_TEST_DURATIONS`` (tests/_suite.py); a LABEL marks
that pass's rows (the oldest-MLflow pass: the same test files again, on another MLflow). Unlabelled
files add up: a test file with unit and job tests has rows in both the unit pass and the next.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite import table  # noqa: E402


def main(args: list[str]) -> int:
    rows: dict[str, dict] = {}
    for arg in args:
        label, _, path = arg.rpartition("=")
        if not Path(path).is_file():
            print(f"tests/_durations.py: no {path} (that pass did not finish)", file=sys.stderr)
            continue
        for file, row in json.loads(Path(path).read_text()).items():
            key = f"{file} ({label})" if label else file
            seen = rows.setdefault(key, {"seconds": 0.0, "tests": 0})
            seen["seconds"] = round(seen["seconds"] + row["seconds"], 2)
            seen["tests"] += row["tests"]
    if not rows:
        return 1
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
