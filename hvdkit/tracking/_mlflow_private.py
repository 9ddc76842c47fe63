"""Every MLflow name hvdkit uses that is not MLflow's public API, in one place.

MLflow may move or rename anything outside its documented API in any release (hvdkit admits
``mlflow>=3.10,<4``). So each private name is imported here, lazily, inside a try: when it is
gone (ImportError / AttributeError) the function falls back to a public alternative or to a
conservative built-in, named in a one-line comment. Nothing else in ``hvdkit`` imports a
``_``-prefixed MLflow name, ``mlflow.utils.*``, ``mlflow.store.*`` or ``mlflow.tracking._*``,
and nothing here runs at import time: a rename can cost a pre-check, never ``import
hvdkit.tracking`` on any rank.

Checked against MLflow 3.10.0 and 3.17.2 (every name below exists in both).
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

# MLflow's documented limits (REST API reference, LogBatch and "Request limits"): what a store
# must accept whatever the client version, so the safe value when the client's own constant moved.
REST_MAX_METRICS_PER_BATCH = 1000
REST_MAX_PARAMS_TAGS_PER_BATCH = 100
REST_MAX_ENTITIES_PER_BATCH = 1000
REST_MAX_ENTITY_KEY_LENGTH = 250
REST_MAX_PARAM_VAL_LENGTH = 6000
REST_MAX_TAG_VAL_LENGTH = 8000
REST_MAX_EXPERIMENT_NAME_LENGTH = 500

# MLflow's documented naming rule for metrics, params and tags (log_metric / log_param docs):
# alphanumerics, underscores, dashes, periods, spaces, colons and slashes, not resolving to
# another path. hvdkit's own copy, used when the client's validators are gone.
_NAME_RE = re.compile(r"^[/\w.\- :]*$")


def _validation():
    """``mlflow.utils.validation`` (not public API); None when it cannot be imported."""
    try:
        from mlflow.utils import validation
    except ImportError:
        return None
    return validation


def _const(name: str, fallback: int) -> int:
    value = getattr(_validation(), name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else fallback


@dataclass(frozen=True)
class BatchLimits:
    metrics: int
    params_tags: int
    entities: int


@functools.cache  # read once per process: _chunks asks for every run of every window
def batch_limits() -> BatchLimits:
    """How much one ``MlflowClient.log_batch`` call may carry."""
    # Fallback: the REST API's documented LogBatch limits (1000 metrics, 100 params + tags, 1000 entities).
    return BatchLimits(
        metrics=_const("MAX_METRICS_PER_BATCH", REST_MAX_METRICS_PER_BATCH),
        params_tags=_const("MAX_PARAMS_TAGS_PER_BATCH", REST_MAX_PARAMS_TAGS_PER_BATCH),
        entities=_const("MAX_ENTITIES_PER_BATCH", REST_MAX_ENTITIES_PER_BATCH),
    )


@dataclass(frozen=True)
class LengthLimits:
    key: int
    param_value: int
    tag_value: int
    experiment_name: int


@functools.cache
def length_limits() -> LengthLimits:
    """Longest key, param value, tag value and experiment name the client accepts."""
    # Fallback: the documented limits (keys 250, param values 6000, tag values 8000, experiment names 500).
    return LengthLimits(
        key=_const("MAX_ENTITY_KEY_LENGTH", REST_MAX_ENTITY_KEY_LENGTH),
        param_value=_const("MAX_PARAM_VAL_LENGTH", REST_MAX_PARAM_VAL_LENGTH),
        tag_value=_const("MAX_TAG_VAL_LENGTH", REST_MAX_TAG_VAL_LENGTH),
        experiment_name=_const("MAX_EXPERIMENT_NAME_LENGTH", REST_MAX_EXPERIMENT_NAME_LENGTH),
    )


def _own_name_problem(name: str) -> str | None:
    if not _NAME_RE.match(name):
        return ("Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), "
                "colons (:) and slashes (/).")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return f"Names may be treated as files and must not resolve to other names; this one resolves to {norm!r}"
    return None


_NAME_VALIDATORS = {"metric": "_validate_metric_name", "param": "_validate_param_name", "tag": "_validate_tag_name"}


def name_problem(kind: str, name: str, *, import_mlflow: bool = True) -> str | None:
    """Why MLflow rejects ``name`` as a ``kind`` ("metric", "param", "tag") name; None if it accepts it.
    ``import_mlflow=False``: by the documented rule alone, for a process that never otherwise
    imports MLflow (a rank that does not write: the import is seconds of its CPU)."""
    if not import_mlflow:
        return _own_name_problem(name)
    from mlflow.exceptions import MlflowException

    validate = getattr(_validation(), _NAME_VALIDATORS[kind], None)
    if not callable(validate):
        # Fallback: MLflow's documented naming rule (hvdkit's copy); log_batch still has the last word.
        return _own_name_problem(name)
    try:
        validate(name)
    except MlflowException as exc:
        return str(getattr(exc, "message", exc))
    return None


def experiment_name_problem(name: object) -> str | None:
    """Why MLflow rejects ``name`` as an experiment name; None if it accepts it."""
    from mlflow.exceptions import MlflowException

    validate = getattr(_validation(), "_validate_experiment_name", None)
    if not callable(validate):
        # Fallback: hvdkit's own rule (a non-empty str within the documented length); create_experiment has the last word.
        if not isinstance(name, str) or not name:
            return f"Invalid experiment name: {name!r}"
        limit = length_limits().experiment_name
        return f"experiment name exceeds the maximum length of {limit}" if len(name) > limit else None
    try:
        validate(name)
    except MlflowException as exc:
        return str(getattr(exc, "message", exc))
    return None


def context_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` adds from the run context providers (user, source, git
    commit, hvdkit's own Horovod provider...), as str. Never raises."""
    try:
        from mlflow.tracking.context.registry import resolve_tags
    except Exception:  # noqa: BLE001 - ImportError when moved; a provider module may fail to import too
        # Fallback: no context tags ({}): the public alternative, mlflow.start_run, would make a run of its own.
        return {}
    try:
        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception:  # noqa: BLE001 - any provider may fail in odd environments; never worth failing a job
        return {}


def tracking_scheme_registered(uri: str) -> bool:
    """Whether MLflow's tracking store registry (which plugins extend) has a store for ``uri``'s
    scheme. True when the registry cannot be reached: hvdkit does not refuse what it cannot check."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        get_store_builder = _tracking_store_registry.get_store_builder
    except (ImportError, AttributeError):
        # Fallback: accept the URI (no public lookup exists); MlflowClient reports an unknown scheme on first use.
        return True
    try:
        get_store_builder(uri)
        return True
    except Exception:  # noqa: BLE001 - UnsupportedModelRegistryStoreURIException and kin
        return False


def set_credentials_path(path: str) -> bool:
    """Make MLflow read its credentials file from ``path`` rather than ``~/.mlflow/credentials``.
    MLflow has no setting for that path; it calls ``mlflow.utils.credentials._get_credentials_path``
    on every request (3.10 to 3.17), which this replaces. False when that function is gone."""
    try:
        from mlflow.utils import credentials
    except ImportError:
        credentials = None
    if not callable(getattr(credentials, "_get_credentials_path", None)):
        # Fallback: none taken here (False): the caller refuses, naming the public ways (the file at
        # ~/.mlflow/credentials, or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).
        return False
    credentials._get_credentials_path = lambda: str(path)
    return True


@dataclass(frozen=True)
class SqliteMetricTables:
    """What the opt-in sqlite bulk metric insert (``_sqlfast``) needs of MLflow's SQL store: its
    ``metrics``, ``latest_metrics`` and ``runs`` tables (SQLAlchemy Core ``Table`` objects), a
    write-session factory and the store's NaN/inf rule."""

    metrics: Any
    latest_metrics: Any
    runs: Any
    write_session: Callable[[], AbstractContextManager]
    sanitize_metric_value: Callable[[float], tuple[bool, float]]


def sqlite_metric_tables(client: Any) -> SqliteMetricTables | None:
    """The SQL store behind ``client`` when it is MLflow's SqlAlchemyStore on sqlite, else None.
    Reached through ``client._tracking_client.store`` and ``mlflow.store.tracking``: all internal."""
    try:
        from mlflow.store.tracking.dbmodels.models import (
            SqlLatestMetric,
            SqlMetric,
            SqlRun,
        )
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = client._tracking_client.store
        if not isinstance(store, SqlAlchemyStore) or getattr(store, "db_type", None) != "sqlite":
            return None
        sessions = store.ManagedSessionMaker
        sanitize = store.sanitize_metric_value
        tables = (SqlMetric.__table__, SqlLatestMetric.__table__, SqlRun.__table__)
    except (ImportError, AttributeError):
        # Fallback: None, i.e. the public MlflowClient.log_batch, one call per run.
        return None

    def write_session() -> AbstractContextManager:
        try:
            return sessions(read_only=False)  # MLflow 3.17: sessions are read-only unless told
        except TypeError:
            return sessions()  # MLflow 3.10: every session may write
    return SqliteMetricTables(*tables, write_session=write_session, sanitize_metric_value=sanitize)


__all__ = [
    "BatchLimits",
    "SqliteMetricTables",
    "sqlite_metric_tables",
    "LengthLimits",
    "batch_limits",
    "context_tags",
    "experiment_name_problem",
    "length_limits",
    "name_problem",
    "set_credentials_path",
    "tracking_scheme_registered",
]
