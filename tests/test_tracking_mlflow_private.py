"""MLflow's non-public names go through one door (hvdkit.tracking._mlflow_private), and each has a
fallback that works when another MLflow version moved the name."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from hvdkit.errors import TrackingError
from hvdkit.tracking import _mlflow_private as P
from hvdkit.tracking import keys
from hvdkit.tracking._apply import Applier, _chunks, _Pending
from hvdkit.tracking._spool import Spool
from hvdkit.tracking._sqlfast import SqliteBulkMetrics

try:
    from test_tracking_support import sqlite_store
except ImportError:  # tests/ made a package
    from tests.test_tracking_support import sqlite_store

HVDKIT = Path(__file__).resolve().parents[1] / "hvdkit"


@pytest.fixture
def validation(monkeypatch):
    """mlflow.utils.validation, with the cached limits re-read before and after the test."""
    from mlflow.utils import validation as v

    P.batch_limits.cache_clear()
    P.length_limits.cache_clear()
    yield v
    P.batch_limits.cache_clear()
    P.length_limits.cache_clear()


def test_no_private_mlflow_name_outside_the_door():
    # An import of a _-prefixed MLflow module or name, of mlflow.store / mlflow.utils, or a reach
    # into a client's private attributes: only _mlflow_private.py may do that.
    private_import = re.compile(
        r"^\s*(from\s+mlflow(\.\w+)*\s+import\s+.*\b_\w+|(from|import)\s+mlflow(\.\w+)*\._\w+"
        r"|(from|import)\s+mlflow\.(store|utils)\b)"
    )
    bad = []
    for path in sorted(HVDKIT.rglob("*.py")):
        if path.name == "_mlflow_private.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if private_import.search(code) or "._tracking_client" in code:
                bad.append(f"{path.relative_to(HVDKIT.parent)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_batch_limits_read_from_mlflow_and_fall_back_to_the_rest_limits(validation, monkeypatch):
    monkeypatch.setattr(validation, "MAX_METRICS_PER_BATCH", 7)
    monkeypatch.setattr(validation, "MAX_PARAMS_TAGS_PER_BATCH", 3)
    assert P.batch_limits() == P.BatchLimits(metrics=7, params_tags=3, entities=validation.MAX_ENTITIES_PER_BATCH)
    P.batch_limits.cache_clear()
    for name in ("MAX_METRICS_PER_BATCH", "MAX_PARAMS_TAGS_PER_BATCH", "MAX_ENTITIES_PER_BATCH"):
        monkeypatch.delattr(validation, name)
    assert P.batch_limits() == P.BatchLimits(metrics=1000, params_tags=100, entities=1000)
    # The applier cuts requests with the fallback limits.
    p = _Pending()
    p.metrics = [Metric("m", float(i), 1, i) for i in range(2500)]
    p.params = {f"p{i}": "v" for i in range(250)}
    chunks = list(_chunks(p))
    assert [len(m) for m, _, _ in chunks] == [900, 900, 700]
    assert [len(pp) for _, pp, _ in chunks] == [100, 100, 50]


def test_length_limits_fall_back_to_the_documented_ones(validation, monkeypatch):
    from hvdkit.tracking._validate import check_experiment_name, flatten_params

    for name in ("MAX_ENTITY_KEY_LENGTH", "MAX_PARAM_VAL_LENGTH", "MAX_TAG_VAL_LENGTH", "MAX_EXPERIMENT_NAME_LENGTH"):
        monkeypatch.setattr(validation, name, "moved")  # not an int: as good as gone
    assert P.length_limits() == P.LengthLimits(key=250, param_value=6000, tag_value=8000, experiment_name=500)
    assert len(flatten_params({"long": "x" * 7000})["long"]) == 6000
    with pytest.raises(TrackingError, match="longer than 500"):
        check_experiment_name("e" * 501)


NAMES = ["loss", "val/acc", "a b:c-d.e_f", "", "bad!", "x/../y", "/abs", "..", "./a", "a//b", "ünï", "a\tb"]


def test_name_checks_fall_back_to_hvdkits_copy_of_the_documented_rule(validation, monkeypatch):
    mlflow_verdicts = {n: P.name_problem("metric", n) is None for n in NAMES}
    for name in ("_validate_metric_name", "_validate_param_name", "_validate_tag_name"):
        monkeypatch.delattr(validation, name)
    fallback_verdicts = {n: P.name_problem("metric", n) is None for n in NAMES}
    assert fallback_verdicts == mlflow_verdicts  # the copy agrees with MLflow's own check
    assert not fallback_verdicts["bad!"] and fallback_verdicts["val/acc"]
    assert "resolves to 'y'" in P.name_problem("tag", "x/../y")

    from hvdkit.tracking._validate import check_param_name, check_tag_name

    with pytest.raises(TrackingError, match="MLflow rejects param name 'bad!'"):
        check_param_name("bad!")
    assert check_tag_name("hvdkit.role") == "hvdkit.role"


def test_experiment_name_check_falls_back_to_hvdkits_rule(validation, monkeypatch):
    assert P.experiment_name_problem("") is not None and P.experiment_name_problem("ok") is None
    monkeypatch.delattr(validation, "_validate_experiment_name")
    assert P.experiment_name_problem("") == "Invalid experiment name: ''"
    assert P.experiment_name_problem(3) == "Invalid experiment name: 3"
    assert P.experiment_name_problem("e" * 501) == "experiment name exceeds the maximum length of 500"
    assert P.experiment_name_problem("e" * 500) is None


def test_context_tags_fall_back_to_none(monkeypatch):
    from hvdkit.tracking import _runs

    monkeypatch.setenv("HOROVOD_RANK", "0")
    monkeypatch.setenv("HOROVOD_SIZE", "1")
    got = P.context_tags()
    assert got.get("horovod.size") == "1"  # through MLflow's registry: our provider is in it
    assert "horovod.rank" in got and "horovod.rank" not in _runs.context_tags()  # rank 0's, not the job's
    monkeypatch.setitem(sys.modules, "mlflow.tracking.context.registry", None)  # the import now fails
    assert P.context_tags() == {}
    assert _runs.context_tags() == {}


def test_tracking_scheme_lookup_falls_back_to_accepting(monkeypatch):
    import mlflow.tracking._tracking_service.utils as service_utils

    from hvdkit.tracking._uri import check_tracking_uri

    assert P.tracking_scheme_registered("nosuchscheme://x") is False
    with pytest.raises(TrackingError, match="unknown scheme 'nosuchscheme'"):
        check_tracking_uri("nosuchscheme://x")
    monkeypatch.delattr(service_utils, "_tracking_store_registry")
    assert P.tracking_scheme_registered("nosuchscheme://x") is True  # not refused: cannot be checked
    assert check_tracking_uri("nosuchscheme://x") == "nosuchscheme://x"


def test_credentials_path_falls_back_to_refusing(monkeypatch, tmp_path):
    from mlflow.utils import credentials

    from hvdkit.tracking import _credentials

    monkeypatch.setattr(credentials, "_get_credentials_path", credentials._get_credentials_path)  # restored after
    assert P.set_credentials_path(str(tmp_path / "creds")) is True
    assert credentials._get_credentials_path() == str(tmp_path / "creds")
    monkeypatch.delattr(credentials, "_get_credentials_path")
    assert P.set_credentials_path(str(tmp_path / "creds")) is False
    with pytest.raises(TrackingError, match="this MLflow cannot read credentials from HVDKIT_MLFLOW_CREDENTIALS"):
        _credentials._point_mlflow_at(tmp_path / "creds")


def test_sqlite_tables_fall_back_to_log_batch(tmp_path, monkeypatch):
    client = MlflowClient(sqlite_store(tmp_path))
    assert SqliteBulkMetrics.for_client(client) is not None
    assert P.sqlite_metric_tables(object()) is None  # no _tracking_client: not a store we know
    monkeypatch.setitem(sys.modules, "mlflow.store.tracking.dbmodels.models", None)
    assert P.sqlite_metric_tables(client) is None
    assert SqliteBulkMetrics.for_client(client) is None


def _applier(tmp_path, uri, **kw):
    spool = Spool.create(tmp_path / "spool", "job-1", uri)
    for ev in (
        {"op": "create_run", "ref": "parent", "parent_ref": None, "parent_run_id": None, "experiment": "e",
         "run_name": "p", "tags": {}, "start_time": 1},
        {"op": "log_batch", "ref": "parent", "metrics": [["loss", 0.5, 2, 1], ["loss", math.nan, 3, 2]]},
    ):
        with spool.open_append() as f:
            f.write(Spool.encode(ev))
    return Applier(spool, uri, **kw)


def test_default_path_is_the_public_client_and_the_bulk_insert_an_opt_in(tmp_path, monkeypatch):
    uri = sqlite_store(tmp_path)
    monkeypatch.delenv(keys.ENV_SQLITE_BULK_METRICS, raising=False)

    def refuse(client):
        raise AssertionError("the default path looked for the sqlite bulk insert")

    with monkeypatch.context() as m:
        m.setattr(SqliteBulkMetrics, "for_client", staticmethod(refuse))
        default = _applier(tmp_path / "a", uri)
        assert default.apply_next() == 2
    assert default._bulk is None
    run_id = default.state.runs["parent"]
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")] == [1, 2]

    monkeypatch.setenv(keys.ENV_SQLITE_BULK_METRICS, "1")
    opted = _applier(tmp_path / "b", uri)
    assert opted.apply_next() == 2
    assert isinstance(opted._bulk, SqliteBulkMetrics)
    hist = MlflowClient(uri).get_metric_history(opted.state.runs["parent"], "loss")
    assert [m.step for m in hist] == [1, 2] and math.isnan(hist[1].value)


@pytest.mark.job
def test_import_survives_mlflow_internals_that_moved():
    # Every private name hvdkit reaches for, gone (MLflow itself imported first, as it needs
    # them): importing the tracking layer and checking names still works, on the fallbacks.
    code = (
        "import sys\n"
        "import mlflow, mlflow.utils.validation as v, mlflow.utils.credentials as c\n"
        "for n in [n for n in dir(v) if n.startswith(('MAX_', '_validate_'))]:\n"
        "    delattr(v, n)\n"
        "del c._get_credentials_path\n"
        "for m in ('mlflow.tracking.context.registry', 'mlflow.tracking._tracking_service.utils',\n"
        "          'mlflow.store.tracking.dbmodels.models', 'mlflow.store.tracking.sqlalchemy_store'):\n"
        "    sys.modules[m] = None\n"
        "import hvdkit.tracking\n"
        "from hvdkit.tracking import _apply, _job, _writer, sync\n"
        "from hvdkit.tracking._mlflow_private import context_tags, tracking_scheme_registered\n"
        "from hvdkit.tracking._validate import flatten_params, check_metric_name\n"
        "from hvdkit.errors import TrackingError\n"
        "assert flatten_params({'optim': {'lr': 0.1}}) == {'optim.lr': '0.1'}\n"
        "assert context_tags() == {} and tracking_scheme_registered('nosuch://x')\n"
        "try:\n"
        "    check_metric_name('a/../b')\n"
        "except TrackingError as e:\n"
        "    print('rejected', e.one_line())\n"
        "print(_apply.batch_limits())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rejected" in proc.stdout and "resolves to 'b'" in proc.stdout
    assert "BatchLimits(metrics=1000, params_tags=100, entities=1000)" in proc.stdout


@pytest.mark.parametrize("opted_in", [False, True])
def test_a_sqlite_store_left_behind_names_the_remedies(tmp_path, monkeypatch, capsys, opted_in):
    import threading

    from hvdkit.tracking._writer import SpoolWriter

    if opted_in:
        monkeypatch.setenv(keys.ENV_SQLITE_BULK_METRICS, "1")
    else:
        monkeypatch.delenv(keys.ENV_SQLITE_BULK_METRICS, raising=False)
    release = threading.Event()

    def slow(self, max_events=5000):  # a healthy store that has not caught up by close()
        release.wait(10)
        return 0

    monkeypatch.setattr(Applier, "apply_next", slow)
    uri = sqlite_store(tmp_path)
    w = SpoolWriter(Spool.create(tmp_path / "spool", "job-1", uri), uri)
    w.submit({"op": "log_batch", "ref": "parent", "metrics": [["loss", 1.0, 1, 1]]})
    report = w.close(0)
    release.set()
    err = capsys.readouterr().err
    assert report.pending == 1 and "replay with: hvdkit sync" in err
    hint = "the sqlite store fell behind this job's metrics — fix: fewer child runs (log.per_rank_runs: k)"
    assert (hint in err) is (not opted_in)
