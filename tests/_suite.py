"""How the suite runs: three tiers in order, a guard on the first, and the per-file time table.

Tiers (docs/testing.md): ``unit`` (pure logic, in this process), ``job`` (real processes: the CLI,
horovodrun, srun), ``system`` (containers, Slurm, a browser, store outages, several hosts, a
PostgreSQL server). A test is ``unit`` unless it is marked ``job``/``horovod`` or ``system`` (by
itself or by its module's ``pytestmark``). Collection puts the tiers in that order; a failure in
the first stops the session before any process starts. A ``unit`` test that starts a process
fails at once, naming the marker it needs: the first tier stays fast because it is checked.

Workers (``make test``: ``-n 2`` after the unit tier): pytest-xdist hands out whole groups, in
collection order (so in tier order): a group is a file, or several files that share a thing
(``SHARED``). A module's fixtures and a session fixture several files read are paid for once, on
one worker, and two files that set up the same system (the network-namespace hosts) never run at
once. (The scheduler is ours, ``FileGroups``: xdist's own ``--dist loadgroup`` renames node ids,
which pytest 9.2 no longer lets a plugin do, and it splits a group silently.)

The table: every test's setup + call + teardown is summed per file; the slowest 15 files are printed
at the end with their share of the whole, and written as JSON to ``$HVDKIT_TEST_DURATIONS`` when
set, so ``make test`` can print one table over both of its passes (``tests/_durations.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

TIERS = ("unit", "job", "system")
_SLOWEST = 15

# Files that must share a worker: the same session fixture, or the same system set up by name.
SHARED = {
    "tests/test_report.py": "digits-sweep",  # conftest.digits_sweep: one np=1,2 sweep for the three
    "tests/test_plan.py": "digits-sweep",
    "tests/test_ui_browser.py": "digits-sweep",
    "tests/test_multihost.py": "netns-hosts",  # tests/_netns.py: the same namespace names and bridge
    "tests/test_secrets.py": "netns-hosts",
}


def tier_of(item) -> str:
    if item.get_closest_marker("system"):
        return "system"
    if item.get_closest_marker("job") or item.get_closest_marker("horovod"):
        return "job"
    return "unit"


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def group_of(nodeid: str) -> str:
    """The worker group of a test: what it shares with other files (``SHARED``), else its file."""
    path = _file_of(nodeid)
    return SHARED.get(path, path)


class Suite:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)
        self.unit_failed = 0

    # -- order and tiers -------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m unit` selects the first tier
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        for item in items:
            item.add_marker(tier_of(item))
        items.sort(key=lambda it: TIERS.index(tier_of(it)))  # stable: file order within a tier

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        yield
        if self.unit_failed and tier_of(item) == "unit" and (nextitem is None or tier_of(nextitem) != "unit"):
            item.session.shouldstop = f"{self.unit_failed} unit test(s) failed: the job and system tiers were not run"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        if tier_of(item) != "unit":
            yield
            return
        real = subprocess.Popen.__init__

        def refuse(popen, args, *a, **kw):
            raise AssertionError(f"{item.nodeid} starts a process ({args!r:.120}) but is in the unit tier: "
                                 "mark it pytest.mark.job (or system)")

        subprocess.Popen.__init__ = refuse
        try:
            yield
        finally:
            subprocess.Popen.__init__ = real

    # -- the table -------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report) -> None:
        path = _file_of(report.nodeid)
        self.seconds[path] += report.duration
        if report.when == "call":
            self.tests[path] += 1
        if report.failed and "unit" in report.keywords:
            self.unit_failed += 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds or hasattr(terminalreporter.config, "workerinput"):  # the controller reports
            return
        rows = {p: {"seconds": round(s, 2), "tests": self.tests[p]} for p, s in self.seconds.items()}
        out = os.environ.get("HVDKIT_TEST_DURATIONS")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(rows, indent=1, sort_keys=True))
        terminalreporter.write_sep("=", f"slowest {_SLOWEST} test files")
        for line in table(rows):
            terminalreporter.write_line(line)


class FileGroups:
    """The pytest-xdist scheduler of ``make test``: one unit of work per ``group_of`` a test."""

    def pytest_xdist_make_scheduler(self, config, log):
        from xdist.scheduler import LoadScopeScheduling

        class Scheduler(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return group_of(nodeid)

        return Scheduler(config, log)


def table(rows: dict[str, dict], limit: int = _SLOWEST) -> list[str]:
    """The slowest ``limit`` files of ``{file: {"seconds", "tests"}}`` with their share, then the total."""
    total = sum(r["seconds"] for r in rows.values()) or 1.0
    ranked = sorted(rows.items(), key=lambda kv: -kv[1]["seconds"])
    lines = [f"{'file':<58} {'tests':>5} {'seconds':>8} {'share':>6}"]
    for path, r in ranked[:limit]:
        lines.append(f"{path:<58} {r['tests']:>5} {r['seconds']:>8.1f} {100 * r['seconds'] / total:>5.1f}%")
    lines.append(f"{'all ' + str(len(rows)) + ' files':<58} {sum(r['tests'] for r in rows.values()):>5} "
                 f"{total:>8.1f} {100.0:>5.1f}%")
    return lines
