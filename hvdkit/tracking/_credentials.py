"""Secrets and MLflow credentials: what the launcher keeps to itself, where a rank's credentials
come from, and how a password inside a URI is masked before it is shown or stored.

Why this exists: horovodrun (0.28.1) copies the launcher's whole environment onto every remote
worker's ssh command line (``env NAME=VALUE ... python ...``, visible in ``ps`` on both ends), or,
with ``--mpi``, hands it to Open MPI's daemons over their own unencrypted TCP channel. So a
multi-host job must not carry a password in its environment; rank 0 (the process that writes to
MLflow) reads the MLflow credentials from a file the cluster mounts instead: MLflow's own
``~/.mlflow/credentials`` or the file named by ``$HVDKIT_MLFLOW_CREDENTIALS`` (a path, not a secret,
so it is forwarded like any variable).

Framework-free and MLflow-free at import time (MLflow is imported only to point it at a file).
"""

from __future__ import annotations

import configparser
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hvdkit.errors import TrackingError

ENV_FILE = "HVDKIT_MLFLOW_CREDENTIALS"
DEFAULT_FILE = "~/.mlflow/credentials"  # MLflow's own (mlflow.utils.credentials)
PASSWORD_KEY = "mlflow_tracking_password"
USERNAME_KEY = "mlflow_tracking_username"
# Group may read (Kubernetes secret volumes with fsGroup give 0440); nobody else may do anything,
# and only the owner may write (a group-writable file lets the group swap the account).
BAD_MODE_BITS = 0o027

# Never forwarded to a remote host. MLflow's own, then the usual cloud and service keys; the
# pattern below catches the rest by name (FOO_PASSWORD, BAR_TOKEN, BAZ_SECRET_ACCESS_KEY...).
SECRET_NAMES = frozenset({
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "GOOGLE_OAUTH_ACCESS_TOKEN", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET",
    "PGPASSWORD", "MYSQL_PWD", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY",
})
# Anchored at the end so that FOO_TOKEN_FILE / FOO_PASSWORD_FILE (paths to mounted secrets) pass.
_SECRET_NAME = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|SECRET_KEY|PRIVATE_KEY|"
                          r"ACCOUNT_KEY|CONNECTION_STRING)$", re.IGNORECASE)
# scheme://user:password@host... The password runs to the last "@" before the host part, so an
# unescaped "@" in it is masked too, not half shown.
_URI_PASSWORD = re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.\-]*://[^/?#@:\s]*):(?P<pw>[^/?#\s]*?)@(?=[^@/?#\s]*(?:[/?#\s]|$))")
MASK = "***"


# -- URIs --------------------------------------------------------------------------------------
def uri_password(value: str) -> str | None:
    """The password a ``scheme://user:password@host`` URI in ``value`` carries, else None."""
    for m in _URI_PASSWORD.finditer(value or ""):
        if m.group("pw") and m.group("pw") != MASK:
            return m.group("pw")
    return None


def mask_uri(value: str) -> str:
    """``value`` with every URI password replaced by ``***`` (``user:***@host``): what may be shown
    (doctor, ui, sync) or stored (spool metadata)."""
    return _URI_PASSWORD.sub(lambda m: f"{m.group('pre')}:{MASK}@" if m.group("pw") else m.group(0), value or "")


def is_masked(value: str) -> bool:
    return f":{MASK}@" in (value or "")


# -- the environment forwarded to other hosts -------------------------------------------------
def is_secret(name: str, value: str) -> bool:
    """Must ``name=value`` stay on the launcher? A known secret's name, a name that says it is
    one, or a value that is a URI with a password in it."""
    return name.upper() in SECRET_NAMES or bool(_SECRET_NAME.search(name)) or uri_password(value) is not None


def strip_secrets(env: Mapping[str, str], keep: frozenset[str] = frozenset()) -> tuple[dict[str, str], list[str]]:
    """``env`` without its secrets (names in ``keep`` excepted), and the names removed, sorted.

    MLFLOW_TRACKING_USERNAME leaves with MLFLOW_TRACKING_PASSWORD: MLflow takes the user from the
    environment before the file, so a launcher's user left behind would be paired with the
    credentials file's password."""
    out = {k: v for k, v in env.items() if k in keep or not is_secret(k, v)}
    if "MLFLOW_TRACKING_PASSWORD" in env and "MLFLOW_TRACKING_PASSWORD" not in out:
        out.pop("MLFLOW_TRACKING_USERNAME", None)
    return out, sorted(set(env) - set(out))


# -- credentials files ---------------------------------------------------------------------------
def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    """The credentials file a process with environment ``env`` reads: ``$HVDKIT_MLFLOW_CREDENTIALS``,
    else MLflow's ``$HOME/.mlflow/credentials``."""
    env = os.environ if env is None else env
    if env.get(ENV_FILE):
        return Path(env[ENV_FILE]).expanduser()
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".mlflow" / "credentials"


def mode_problem(path: str | os.PathLike[str], mode: int) -> TrackingError | None:
    """The refusal for a credentials file of permission bits ``mode``, or None when they are safe."""
    if not mode & BAD_MODE_BITS:
        return None
    who = []
    if mode & 0o007:
        can = [verb for bit, verb in ((0o004, "read"), (0o002, "write"), (0o001, "execute")) if mode & bit]
        who.append(f"others can {' and '.join(can)} it")
    if mode & 0o020:
        who.append("its group can write it")
    return TrackingError(f"MLflow credentials file {path} has mode {stat.S_IMODE(mode):04o} ({'; '.join(who)})",
                         fix=f"chmod 600 {path}")


def read_file(path: Path) -> tuple[str | None, bool]:
    """(username, has a password) of an MLflow credentials file; refuses unsafe permissions."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TrackingError(f"MLflow credentials file {path}: {exc.strerror}",
                            fix=f"create it (mode 600) with an [mlflow] section holding {USERNAME_KEY} and "
                                f"{PASSWORD_KEY}, or unset {ENV_FILE}") from None
    problem = mode_problem(path, mode)
    if problem:
        raise problem
    parser = configparser.ConfigParser(interpolation=None)  # a "%" in a password is a "%"
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error) as exc:
        raise TrackingError(f"MLflow credentials file {path} cannot be read: {type(exc).__name__}",
                            fix=f"write it as an ini file: [mlflow] / {USERNAME_KEY} = ... / {PASSWORD_KEY} = ...") from None
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    return section.get(USERNAME_KEY), bool(section.get(PASSWORD_KEY))


@dataclass(frozen=True)
class Source:
    """Where this process's MLflow credentials come from (never the password itself)."""

    kind: str  # "env" | "token" | "file" | "none"
    path: Path | None = None
    user: str | None = None
    has_password: bool = True

    def describe(self) -> str:
        who = f"user {self.user}" if self.user else "no user"
        if self.kind == "token":
            return "MLflow credentials: a token from MLFLOW_TRACKING_TOKEN in the environment"
        if self.kind == "env":
            return f"MLflow credentials: {who}, password from MLFLOW_TRACKING_PASSWORD in the environment"
        if self.kind == "file":
            held = "" if self.has_password else f" (it holds no {PASSWORD_KEY})"
            return f"MLflow credentials: {who} from the file {self.path}{held}"
        return (f"MLflow credentials: none (no MLFLOW_TRACKING_PASSWORD, {ENV_FILE} or {DEFAULT_FILE}); "
                "requests go unauthenticated")


def find_source(env: Mapping[str, str] | None = None) -> Source:
    """What MLflow will authenticate with in a process of environment ``env``, in MLflow's own order
    (the environment before the file). A file in use with unsafe permissions, or a named file that
    is missing, raises TrackingError (exit 2)."""
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return Source("token")
    if env.get("MLFLOW_TRACKING_PASSWORD"):
        return Source("env", user=env.get("MLFLOW_TRACKING_USERNAME"))
    path = credentials_path(env)
    if env.get(ENV_FILE) or path.exists():
        user, has_password = read_file(path)
        return Source("file", path, env.get("MLFLOW_TRACKING_USERNAME") or user, has_password)
    return Source("none", user=env.get("MLFLOW_TRACKING_USERNAME"))


_active: Source | None = None


def _rank_zero() -> bool:
    """Rank 0 of a job (horovodrun, mpirun, srun): the rank that writes to MLflow. The launcher says
    nothing of its own credentials (it keeps them; see hvdkit.launch.worker_env for what it holds
    back), so a job prints the line once, and a refusal before start stays the only line."""
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(key):
            return os.environ[key] == "0"
    return False


def use_credentials(uri: str) -> Source | None:
    """Before this process first talks to the MLflow server at ``uri``: settle where its
    credentials come from (once per process), point MLflow at ``$HVDKIT_MLFLOW_CREDENTIALS`` if
    that is the source, and, on rank 0 (the process that writes to MLflow), say which source it
    is in one line on stderr. Stores that are not a server (sqlite, a directory, a database URI)
    take no MLflow credentials: nothing to do."""
    global _active
    if not uri.startswith(("http://", "https://")):
        return None
    if _active is None:
        source = find_source()
        if source.kind == "file" and os.environ.get(ENV_FILE):
            _point_mlflow_at(source.path)
        if _rank_zero():
            print(f"hvdkit: {source.describe()}", file=sys.stderr, flush=True)
        _active = source
    return _active


def _point_mlflow_at(path: Path | None) -> None:
    # MLflow has no setting for the path of its credentials file (see
    # _mlflow_private.set_credentials_path). Pointing it there keeps the password out of this
    # process's environment, hence out of any child's.
    from hvdkit.tracking._mlflow_private import set_credentials_path

    if not set_credentials_path(str(path)):
        raise TrackingError(f"this MLflow cannot read credentials from {ENV_FILE} ({path})",
                            fix=f"unset {ENV_FILE} and put the file at {DEFAULT_FILE} on rank 0's host")


__all__ = ["ENV_FILE", "Source", "credentials_path", "find_source", "is_secret", "mask_uri", "mode_problem",
           "strip_secrets", "uri_password", "use_credentials"]
