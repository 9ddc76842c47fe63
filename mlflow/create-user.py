"""Create an MLflow user on a basic-auth server (or set its password if it exists), then write that
user's MLflow credentials file, which is how training jobs read their password.

    MLFLOW_TRACKING_URI=http://mlflow:5000 MLFLOW_ADMIN_PASSWORD=... MLFLOW_NEW_USER_PASSWORD=... \\
        python mlflow/create-user.py trainer

Signs in as $MLFLOW_ADMIN_USERNAME (admin). Writes $MLFLOW_CREDENTIALS_FILE (default
~/.mlflow/credentials, mode 600) in MLflow's own format. Passwords come from the environment
only (never argv) and are never printed. Waits up to $HVDKIT_WAIT_TIMEOUT (300 s) for the server.
Used by docker/entrypoint.sh (`mlflow-user NAME`); stdlib only.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def call(base: str, method: str, path: str, auth: tuple[str, str], body: dict) -> tuple[int, dict]:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(base.rstrip("/") + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text or b"{}")
        except ValueError:
            return e.code, {"message": text.decode(errors="replace")[:200]}


def main() -> int:
    name = sys.argv[1]
    base = os.environ["MLFLOW_TRACKING_URI"]
    admin = (os.environ.get("MLFLOW_ADMIN_USERNAME", "admin"), os.environ["MLFLOW_ADMIN_PASSWORD"])
    password = os.environ["MLFLOW_NEW_USER_PASSWORD"]
    deadline = time.monotonic() + float(os.environ.get("HVDKIT_WAIT_TIMEOUT", "300"))
    while True:  # the server may still be starting (compose starts everything at once)
        try:
            status, body = call(base, "POST", "/api/2.0/mlflow/users/create", admin, {"username": name, "password": password})
            break
        except OSError as e:
            if time.monotonic() > deadline:
                print(f"mlflow-user: error: {base} did not answer ({e}) — fix: start the server, check MLFLOW_TRACKING_URI", file=sys.stderr)
                return 2
            time.sleep(1)
    if status == 401:
        print(f"mlflow-user: error: {base} refused the admin sign-in (HTTP 401) — fix: set MLFLOW_ADMIN_PASSWORD to the server's admin password", file=sys.stderr)
        return 2
    if status != 200 and body.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        status, body = call(base, "PATCH", "/api/2.0/mlflow/users/update-password", admin, {"username": name, "password": password})
        action = "password updated"
    else:
        action = "created"
    if status != 200:
        print(f"mlflow-user: error: {base} answered HTTP {status} for user {name!r}: {body.get('message', body)}", file=sys.stderr)
        return 2
    path = Path(os.environ.get("MLFLOW_CREDENTIALS_FILE") or Path.home() / ".mlflow" / "credentials")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"[mlflow]\nmlflow_tracking_username = {name}\nmlflow_tracking_password = {password}\n")
    os.replace(tmp, path)  # whole or not at all: a waiting launcher never reads half a file
    print(f"mlflow-user: user {name!r} {action} on {base}; credentials in {path} (mode 600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
