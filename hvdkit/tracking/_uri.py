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
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    _use_credentials(uri)
    return uri


def _use_credentials(uri: str) -> None:
    # Every way hvdkit reaches a store passes through resolve_tracking_uri or absolute_uri, so this
    # is the one place a process settles (and rank 0 reports) where its MLflow credentials come from.
    from hvdkit.tracking._credentials import use_credentials

    use_credentials(uri)


def absolute_uri(uri: str) -> str:
    """The same store named independently of the cwd (for the spool, which may be replayed from
    another directory): ``sqlite:///rel.db`` becomes ``sqlite:////abs/rel.db``; others unchanged."""
    _use_credentials(uri)
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


# Schemes MLflow's tracking store registry always has (file store, REST, Databricks, SQLAlchemy
# databases, e.g. "postgresql+psycopg2"); any other scheme is looked up in the registry itself,
# which plugins extend (_mlflow_private.tracking_scheme_registered).
_BUILTIN_SCHEMES = frozenset({"", "file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql"})
_URI_FIX = "set MLFLOW_TRACKING_URI (or --tracking-uri) to sqlite:///PATH.db, http(s)://HOST:PORT or a directory"


def _registered_scheme(uri: str) -> bool:
    from hvdkit.tracking._mlflow_private import tracking_scheme_registered

    return tracking_scheme_registered(uri)


def _sqlite_file(uri: str) -> str | None:
    """The database file of a ``sqlite://`` URI, None for an in-memory database."""
    rest = uri.split("://", 1)[1].split("?", 1)[0]
    path = rest[1:] if rest.startswith("/") else rest
    return None if path in ("", ":memory:") else path


def check_tracking_uri(uri: str) -> str:
    """Before a job starts (or a sync): can ``uri`` ever name a store? An unknown scheme, or a
    sqlite file in a directory that does not exist, is the user's error (TrackingError, exit 2,
    nothing started). Whether a server answers is not checked: an unreachable store at start is
    an outage like any other, which the spool covers (``hvdkit sync``)."""
    from pathlib import Path
    from urllib.parse import urlparse

    from hvdkit.errors import TrackingError

    scheme = urlparse(uri).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter: MLflow reads a local path
        scheme = ""
    base = scheme.split("+", 1)[0]
    if base not in _BUILTIN_SCHEMES and not _registered_scheme(uri):
        raise TrackingError(f"MLflow tracking URI {uri!r}: unknown scheme {scheme!r}", fix=_URI_FIX)
    if base == "sqlite":
        path = _sqlite_file(uri)
        if path is not None:
            db = Path(path).resolve()
            if db.is_dir():
                raise TrackingError(f"MLflow tracking URI {uri!r} names a directory", fix=f"name a file in it, e.g. sqlite:///{db / 'mlflow.db'}")
            if not db.parent.is_dir():
                raise TrackingError(f"MLflow tracking URI {uri!r}: directory {db.parent} does not exist",
                                    fix=f"create it (mkdir -p {db.parent}) or point the URI at an existing directory")
    elif base in ("", "file"):
        local = Path(urlparse(uri).path if base == "file" else uri)
        if local.exists() and not local.is_dir():
            raise TrackingError(f"MLflow tracking URI {uri!r} is a file, not a store directory", fix=_URI_FIX)
    return uri


def check_tracking_args(experiment: str | None = None, tracking_uri: str | None = None) -> str:
    """What ``hvdkit run`` / ``scale`` check of their tracking before a job starts: the store URI
    (``tracking_uri``, else $MLFLOW_TRACKING_URI, else the default) and ``--experiment``."""
    uri = check_tracking_uri(resolve_tracking_uri(tracking_uri))
    if experiment is not None:
        from hvdkit.tracking._validate import check_experiment_name

        check_experiment_name(experiment)
    return uri
