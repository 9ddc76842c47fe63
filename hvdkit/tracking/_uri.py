"""Which MLflow store hvdkit writes to."""

from __future__ import annotations

import os

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

_REMOTE_SCHEMES = ("http://", "https://", "databricks")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (in the cwd).

    We resolve it ourselves rather than asking ``mlflow.get_tracking_uri()`` so the default does
    not depend on the MLflow version, and we never set MLflow's global URI: user code in the same
    process keeps its own.
    """
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return DEFAULT_TRACKING_URI


def absolute_uri(uri: str) -> str:
    """The same store named independently of the cwd (for the spool, which may be replayed from
    another directory): ``sqlite:///rel.db`` becomes ``sqlite:////abs/rel.db``; others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = uri[len(prefix) :]
        if path and path != ":memory:":
            return prefix + os.path.abspath(path)
    return uri


def is_remote(uri: str) -> bool:
    """A store behind a network round trip, where a few concurrent requests hide latency.
    A local sqlite file is the opposite: concurrent writers only contend for its lock."""
    return uri.startswith(_REMOTE_SCHEMES)
