"""Issue 15 item 6: what `hvdkit run` prints. Rank 0's lines without horovodrun's prefix, one
progress display drawn by the launcher, the other ranks only when it matters (with their rank), the
whole raw output in a log file, and a summary whose two throughputs are the parent run's metrics."""

from __future__ import annotations

import io
import os
import re
import threading
import time

import pytest
from mlflow import MlflowClient

from conftest import explain, hvdkit, sqlite_store, wait_until, worker_env
from test_tracking_support import job_runs
from hvdkit.launch import _console
from hvdkit.tracking import keys
from hvdkit.tracking.efficiency import run_throughput

LOG_LINE = re.compile(r"every rank's full output: (\S+\.log)")


# -- pure logic ----------------------------------------------------------------------------------
def _relay(tmp_path, live=False):
    out, err = io.StringIO(), io.StringIO()
    log = _console.RawLog(tmp_path / "raw.log")
    return _console.Relay(-1, -2, log, out=out, err=err, live=live), out, err


def test_parse_line_strips_gloo_mpi_and_timestamped_prefixes():
    assert _console.parse_line("[0]<stdout>:hello\n", "stdout") == _console.Line(0, "stdout", "hello", "\n")
    assert _console.parse_line("[1,3]<stderr>:oops\r", "stdout") == _console.Line(3, "stderr", "oops", "\r")
    assert _console.parse_line("Thu Dec  3 10:00:00 2026[2]<stdout>:x", "stdout") == _console.Line(2, "stdout", "x", "")
    assert _console.parse_line("horovodrun says [hi]\n", "stderr") == _console.Line(None, "stderr", "horovodrun says [hi]", "\n")
    assert _console.parse_progress('@hvdkit:progress {"n":3,"total":9,"postfix":""}') == {"n": 3, "total": 9, "postfix": ""}
    assert _console.parse_progress("@hvdkit:progress not json") is None
    assert _console.parse_progress("an ordinary line") is None


def test_filter_shows_rank0_and_what_matters_from_others(tmp_path):
    relay, out, err = _relay(tmp_path)
    feed = [
        ("[0]<stdout>:rank zero says hi\n", "stdout"),
        ("[1]<stdout>:rank one chatter\n", "stdout"),
        ("[0]<stderr>: 40%|####      | 4/10\r", "stderr"),  # a foreign redraw: dropped off a terminal
        ("[1]<stderr>:/x/y.py:3: UserWarning: careful\n", "stderr"),
        ("[1]<stderr>:  warnings.warn('careful')\n", "stderr"),  # the warning's source line follows it
        ("[1]<stderr>:more chatter\n", "stderr"),
        ("[1]<stderr>:Traceback (most recent call last):\n", "stderr"),
        ('[1]<stderr>:  File "t.py", line 1, in <module>\n', "stderr"),
        ("[1]<stderr>:ValueError: bad\n", "stderr"),
        ("[1]<stdout>:back to work\n", "stdout"),
        # an elastic survivor that took over rank 0 keeps its first prefix: hvdkit's lines still show
        ("[2]<stderr>:hvdkit: membership epoch 1 at step 40: 2 ranks (failure; ...)\n", "stderr"),
        ("horovodrun's own line\n", "stderr"),
    ]
    for raw, stream in feed:
        relay.feed(raw, stream)
    relay.log.close()
    assert out.getvalue() == "rank zero says hi\n"
    assert err.getvalue().splitlines() == [
        "[rank 1] /x/y.py:3: UserWarning: careful",
        "[rank 1]   warnings.warn('careful')",
        "[rank 1] Traceback (most recent call last):",
        '[rank 1]   File "t.py", line 1, in <module>',
        "[rank 1] ValueError: bad",
        "[rank 2] hvdkit: membership epoch 1 at step 40: 2 ranks (failure; ...)",
        "horovodrun's own line",
    ]
    assert (tmp_path / "raw.log").read_bytes().decode() == "".join(raw for raw, _ in feed)  # nothing lost


def test_progress_lines_round_trip_to_one_line_per_ten_percent(tmp_path):
    wire = io.StringIO()
    bar = _console.ProgressLines(total=50, initial=0, file=wire, interval_s=3600)
    for step in range(1, 51):
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1 / step:.4f}", epoch=1)
    bar.close()
    sent = wire.getvalue().splitlines()
    assert 11 <= len(sent) <= 13, sent  # 0 %, each 10 %, the close: not one per step
    relay, out, err = _relay(tmp_path)
    for line in sent:
        relay.feed(f"[0]<stderr>:{line}\n", "stderr")
    shown = err.getvalue().splitlines()
    pcts = [int(re.search(r"\((\s*\d+) %\)", s).group(1)) for s in shown]
    assert pcts in (list(range(0, 101, 10)), [*range(0, 101, 10), 100]), shown  # the last: the closing loss
    assert "loss=0.0200, epoch=1" in shown[-1] and out.getvalue() == ""
    assert "@hvdkit:progress" not in err.getvalue()


def test_relay_thread_ends_with_the_job_even_if_a_grandchild_holds_the_pipe(tmp_path, monkeypatch):
    monkeypatch.setattr(_console, "DRAIN_S", 0.5)
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    out, err = io.StringIO(), io.StringIO()
    relay = _console.Relay(r1, r2, _console.RawLog(tmp_path / "raw.log"), out=out, err=err, live=False).start()
    os.write(w1, "[0]<stdout>:héllo\n[1]<stdout>:hidden\n".encode())
    os.write(w2, b"[0]<stderr>:no newline at the end")
    os.close(w2)  # stderr ends; stdout stays open, as a left-behind grandchild would keep it
    wait_until(lambda: "héllo" in out.getvalue() and err.getvalue(), 30, "the relay reading both pipes")
    t0 = time.monotonic()
    relay.finish()
    assert time.monotonic() - t0 < 2.0
    assert not any(t.name == "hvdkit-console" and t.is_alive() for t in threading.enumerate())
    assert out.getvalue() == "héllo\n" and err.getvalue() == "no newline at the end"
    os.close(w1)
    os.close(r1)
    os.close(r2)


# -- a real 2-rank job -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    uri = sqlite_store(tmp)
    t0 = time.monotonic()
    res = hvdkit(["run", "recipes/digits.yaml", "-np", "2", "steps=40", f"checkpoint.dir={tmp / 'ck'}"],
                 env=worker_env(MLFLOW_TRACKING_URI=uri, XDG_CACHE_HOME=str(tmp / "cache")))
    print(f"console-test digits job {time.monotonic() - t0:.1f}s")
    assert res.returncode == 0, explain(res)
    return res, uri


@pytest.mark.horovod
def test_hvdkit_run_console_has_no_prefixes_and_one_progress_display(digits_job):
    res, _ = digits_job
    both = res.stdout + res.stderr
    assert "[0]<" not in both and "[1]<" not in both, both[-3000:]
    assert "@hvdkit:progress" not in both
    progress = [l for l in res.stderr.splitlines() if l.startswith("hvdkit: step ")]
    assert 2 <= len(progress) <= 12, res.stderr[-3000:]  # a few lines (every 10 %), never a redraw per step
    assert progress[-1].startswith("hvdkit: step 40/40 (100 %)"), progress
    assert "\r" not in both


@pytest.mark.horovod
def test_summary_throughputs_are_the_parent_runs_metrics(digits_job):
    res, uri = digits_job
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [r for r in job_runs(client) if r.data.tags.get(keys.TAG_ROLE) == keys.ROLE_PARENT]
    steps_rate = run_throughput(client, parent.info.run_id)  # history_throughput over samples_per_sec
    (end_to_end,) = client.get_metric_history(parent.info.run_id, keys.SAMPLES_PER_SEC_END_TO_END)
    rows = dict(re.findall(r"samples/s, (?:training steps|end to end) \((\w+)\)\s*│\s*([\d,.]+)", res.stdout))
    assert set(rows) == {keys.SAMPLES_PER_SEC, keys.SAMPLES_PER_SEC_END_TO_END}, res.stdout[-2500:]
    assert rows[keys.SAMPLES_PER_SEC] == f"{steps_rate:,.1f}"
    assert rows[keys.SAMPLES_PER_SEC_END_TO_END] == f"{end_to_end.value:,.1f}"
    assert end_to_end.step == 40
    # end to end includes evaluation and the checkpoint: never faster than the steps alone
    assert 0 < end_to_end.value < steps_rate
    print(f"console-test samples/s training steps {steps_rate:,.1f}, end to end {end_to_end.value:,.1f}")


WARNING_RECIPE = '''
import os
import warnings

from hvdkit.recipe import PythonRecipe


class Chatty(PythonRecipe):
    config = {"name": "chatty", "model": {"name": "custom"}, "data": {"name": "digits"}, "batch_size": 32, "steps": 10,
              "eval": {"enabled": False}}

    def build_model(self, framework, input_shape, num_classes):
        import torch

        rank = os.environ.get("HOROVOD_RANK")
        print(f"ordinary line from rank {rank}", flush=True)
        if rank == "1":
            warnings.warn("rank one is worried", UserWarning)
        width = 1
        for d in input_shape:
            width *= d
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(width, num_classes))
'''


@pytest.mark.horovod
def test_a_warning_on_rank_1_is_shown_with_its_rank_and_the_log_keeps_everything(tmp_path):
    recipe = tmp_path / "chatty.py"
    recipe.write_text(WARNING_RECIPE)
    t0 = time.monotonic()
    res = hvdkit(["run", str(recipe), "-np", "2", "--no-track", "checkpoint.dir=null"], cwd=tmp_path,
                 env=worker_env(XDG_CACHE_HOME=str(tmp_path / "cache")))
    print(f"console-test warning job {time.monotonic() - t0:.1f}s")
    assert res.returncode == 0, explain(res)
    both = res.stdout + res.stderr
    assert "ordinary line from rank 0" in res.stdout
    assert "ordinary line from rank 1" not in both  # rank 1's chatter stays off the console...
    assert re.search(r"^\[rank 1\] .*UserWarning: rank one is worried$", res.stderr, re.M), res.stderr[-3000:]
    (log,) = LOG_LINE.findall(res.stderr)
    assert log.startswith(str(tmp_path / "cache" / "hvdkit" / "logs"))
    raw = open(log, encoding="utf-8").read()
    assert "[1]<stdout>:ordinary line from rank 1" in raw  # ...but the log has it
    assert "[1]<stderr>:" in raw and "rank one is worried" in raw
    assert "[0]<stdout>:ordinary line from rank 0" in raw
