"""``hvdkit ui``: the MLflow UI on the store hvdkit writes to, opened on the experiment's runs.

For a local store (sqlite, file) it starts ``mlflow server`` bound to 127.0.0.1 and waits for it;
for a tracking server (http/https) it only prints that server's URL. The URL names the
experiment's runs page: MLflow 3 otherwise opens on its GenAI overview, not on training runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from hvdkit.errors import TrackingError, UsageError

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Target:
    tracking_uri: str
    base_url: str  # where the UI answers, e.g. http://127.0.0.1:5000
    experiment_id: str | None  # None: no such experiment (yet)

    @property
    def url(self) -> str:
        if self.experiment_id is None:
            return f"{self.base_url}/#/experiments"
        return f"{self.base_url}/#/experiments/{self.experiment_id}/runs"


def experiment_id(tracking_uri: str, experiment: str) -> str | None:
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    return exp.experiment_id if exp is not None else None


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def server_command(port: int) -> list[str]:
    # One worker: a local UI serves one person, and the default 4 would each load the store on a
    # small machine. Artifacts of runs logged straight to the store keep their own (local) paths.
    # The store itself goes in server_env: a database URI may hold a password, and argv is public.
    return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1"]


def server_env(tracking_uri: str) -> dict[str, str]:
    """The UI server's environment: ours plus the store, read by ``mlflow server``'s
    ``--backend-store-uri`` option from MLFLOW_BACKEND_STORE_URI."""
    return dict(os.environ, MLFLOW_BACKEND_STORE_URI=tracking_uri)


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TrackingError(f"mlflow server exited with {proc.returncode} before answering on {url}",
                                fix="see its output above; check the tracking URI and the port")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise TrackingError(f"mlflow server did not answer on {url} within {timeout:.0f}s ({last})",
                        fix="see its output above")


def _can_open_browser() -> bool:
    # On a headless Linux node webbrowser.open would pick a text browser and take over the
    # terminal; there, printing the URL is the useful thing.
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(port: int = 5000, tracking_uri: str | None = None, experiment: str = "hvdkit", open_browser: bool = True,
          echo: Callable[[str], None] = print) -> int:
    """Run the UI until interrupted; returns the exit code for the CLI."""
    from hvdkit.tracking._credentials import mask_uri
    from hvdkit.tracking._uri import absolute_uri, is_remote, resolve_tracking_uri

    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    shown = mask_uri(uri)  # what is printed: never a password from the URI
    if uri.startswith("databricks"):
        raise UsageError(f"tracking URI {shown} is a Databricks workspace", fix="open the experiment in Databricks")
    if is_remote(uri):
        # A tracking server already serves its UI: nothing to start. The browser gets the URL
        # without a password (it asks for one itself).
        parts = urllib.parse.urlsplit(uri)
        base = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
        target = Target(uri, base, experiment_id(uri, experiment))
        echo(f"hvdkit: MLflow UI of {shown}: {target.url}")
        if open_browser and _can_open_browser():
            import webbrowser

            webbrowser.open(target.url)
        return 0
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port", fix="pass --port between 1 and 65535")
    if not port_free(port):
        raise UsageError(f"port {port} on {HOST} is in use", fix=f"pass another port, e.g. --port {port + 1}")
    target = Target(uri, f"http://{HOST}:{port}", experiment_id(uri, experiment))
    proc = subprocess.Popen(server_command(port), env=server_env(uri), start_new_session=True)

    def stop(signum, _frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        wait_until_up(f"{target.base_url}/health", proc)
        if target.experiment_id is None:
            echo(f"hvdkit: no experiment {experiment!r} in {shown} yet; listing all experiments")
        echo(f"hvdkit: MLflow UI of {shown}: {target.url}")
        echo("hvdkit: Ctrl-C stops it")
        if open_browser and _can_open_browser():
            import webbrowser

            webbrowser.open(target.url)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
                proc.wait(10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


__all__ = ["Target", "serve", "server_command", "server_env", "wait_until_up"]
