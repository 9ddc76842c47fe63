"""The suite's own plumbing (tests/_suite.py, tests/_durations.py): which tests share a worker, and
the per-file table over several passes. The worker test runs real pytest-xdist workers on a small
test folder, so a pytest or xdist release that stops honouring our scheduler fails here, by name,
instead of letting two files that share a system run at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _durations import main as durations_main
from _suite import SHARED, group_of
from conftest import REPO


def test_a_file_is_its_own_group_unless_it_shares_a_thing():
    assert group_of("tests/test_report.py::test_x") == group_of("tests/test_plan.py::test_y[a-b]") == "digits-sweep"
    assert group_of("tests/test_multihost.py::test_x") == group_of("tests/test_secrets.py::test_y") == "netns-hosts"
    assert group_of("tests/test_clipping.py::test_x[torch]") == group_of("tests/test_clipping.py::C::test_y") \
        == "tests/test_clipping.py"
    assert group_of("tests/test_clipping.py::test_x") != group_of("tests/test_precision.py::test_x")


def test_every_shared_file_exists():
    """A renamed file would silently leave its group and run beside the files it shares a thing with."""
    missing = [f for f in SHARED if not (REPO / f).is_file()]
    assert not missing, f"tests/_suite.py SHARED names files that do not exist: {missing}"


def test_the_table_adds_up_unlabelled_passes_and_keeps_labelled_ones_apart(tmp_path, capsys):
    (tmp_path / "unit.json").write_text(json.dumps({"tests/test_a.py": {"seconds": 1.5, "tests": 3}}))
    (tmp_path / "main.json").write_text(json.dumps({"tests/test_a.py": {"seconds": 10.0, "tests": 2},
                                                    "tests/test_b.py": {"seconds": 4.0, "tests": 1}}))
    (tmp_path / "old.json").write_text(json.dumps({"tests/test_a.py": {"seconds": 2.0, "tests": 2}}))
    assert durations_main([str(tmp_path / "unit.json"), str(tmp_path / "main.json"),
                           f"MLflow 3.10={tmp_path / 'old.json'}", str(tmp_path / "absent.json")]) == 0
    out = capsys.readouterr()
    rows = {m[1].strip(): (int(m[2]), float(m[3])) for m in re.finditer(r"^(tests/\S+(?: \([^)]*\))?)\s+(\d+)\s+([\d.]+)",
                                                                        out.out, re.M)}
    assert rows == {"tests/test_a.py": (5, 11.5), "tests/test_b.py": (1, 4.0), "tests/test_a.py (MLflow 3.10)": (2, 2.0)}
    assert "all 3 files" in out.out and "17.5" in out.out  # the total over all three rows
    assert "absent.json (that pass did not finish)" in out.err


@pytest.mark.job
def test_xdist_workers_take_whole_files_and_shared_groups(tmp_path):
    """Four files on two real workers: each file's tests run on one worker, and the two files of one
    SHARED group on the same one."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text(
        f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "import _suite\n"
        "_suite.SHARED = {'tests/test_c.py': 'pair', 'tests/test_d.py': 'pair'}\n"
        "def pytest_configure(config):\n"
        "    config.pluginmanager.register(_suite.FileGroups(), 'hvdkit-file-groups')\n")
    for name in "abcd":
        (tests / f"test_{name}.py").write_text(
            "import pytest\n@pytest.mark.parametrize('i', range(3))\ndef test_x(i):\n    pass\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\].*PASSED tests/(test_\w)\.py::", res.stdout)
    assert len(ran) == 12, res.stdout[-3000:]
    workers = {f: {w for w, g in ran if g == f} for f in ("test_a", "test_b", "test_c", "test_d")}
    assert all(len(w) == 1 for w in workers.values()), workers  # a file is never split
    assert workers["test_c"] == workers["test_d"], workers  # a shared group stays together
    assert "scheduling tests via Scheduler" in res.stdout  # ours, not xdist's default
