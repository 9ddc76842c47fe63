#!/usr/bin/env bash
# hvdkit's team MLflow tracking server: PostgreSQL backend store, proxied artifact store, and
# MLflow's basic-auth app. Configuration comes from the environment (see mlflow/README.md):
#
#   MLFLOW_BACKEND_STORE_URI       postgresql+psycopg2://ROLE:PASSWORD@HOST:PORT/DB (.ci/postgres prints one), or
#   MLFLOW_DB_HOST, MLFLOW_DB_PORT (5432), MLFLOW_DB_NAME (mlflow), MLFLOW_DB_USER (mlflow), MLFLOW_DB_PASSWORD
#                                  the same in parts (compose, Kubernetes): the URI is built here with
#                                  the role and password URL-encoded, so any password works
#   MLFLOW_ADMIN_PASSWORD          required  the admin user's password (12+ characters; never password1234)
#   MLFLOW_ADMIN_USERNAME          admin
#   MLFLOW_ARTIFACTS_DESTINATION   ./mlartifacts   (a directory, or s3://..., gs://..., ...)
#   MLFLOW_HOST                    127.0.0.1       (0.0.0.0 in a container; put TLS in front of it beyond a LAN)
#   MLFLOW_PORT                    5000
#   MLFLOW_ALLOWED_HOSTS           Host headers accepted (DNS-rebinding guard); default: localhost,
#                                  127.0.0.1 and MLFLOW_HOST, any port
#   MLFLOW_WORKERS                 2
#   MLFLOW_AUTH_DATABASE_URI       users and permissions; default: the backend store (own tables,
#                                  own alembic version table)
#   MLFLOW_FLASK_SERVER_SECRET_KEY CSRF key; generated at start if unset (set it when several servers share a store)
#   MLFLOW_SERVER_STATE_DIR        where basic_auth.ini is written (mode 600); default: a new private temp dir
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  false (MLflow's GenAI job runner; training runs do not use it)
#
# Extra arguments go to `mlflow server` unchanged. The database URI travels in the environment
# (mlflow reads MLFLOW_BACKEND_STORE_URI), never on a command line that `ps` shows.
set -euo pipefail
die() { echo "mlflow/server.sh: error: $*" >&2; exit 2; }

# 1. Refuse unsafe or missing configuration, before anything starts.
[ -n "${MLFLOW_ADMIN_PASSWORD:-}" ] || die "MLFLOW_ADMIN_PASSWORD is not set — set it to the admin password (12+ characters) and restart"
[ "$MLFLOW_ADMIN_PASSWORD" != password1234 ] || die "MLFLOW_ADMIN_PASSWORD is MLflow's old public default 'password1234' — choose another password"
[ ${#MLFLOW_ADMIN_PASSWORD} -ge 12 ] || die "MLFLOW_ADMIN_PASSWORD is shorter than 12 characters (MLflow's minimum) — choose a longer one"
case "$MLFLOW_ADMIN_PASSWORD" in
  *$'\n'*|*$'\r'*) die "MLFLOW_ADMIN_PASSWORD contains a line break" ;;
  [[:space:]]*|*[[:space:]]) die "MLFLOW_ADMIN_PASSWORD starts or ends with white space (MLflow's config reader would drop it)" ;;
esac
if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ] && [ -n "${MLFLOW_DB_HOST:-}" ]; then
  [ -n "${MLFLOW_DB_PASSWORD:-}" ] || die "MLFLOW_DB_HOST is set but MLFLOW_DB_PASSWORD is not — set it to the database role's password"
  MLFLOW_BACKEND_STORE_URI=$(python3 - <<'EOF'
import os
from urllib.parse import quote

part = lambda name, default: quote(os.environ.get(name) or default, safe="")
print(f"postgresql+psycopg2://{part('MLFLOW_DB_USER', 'mlflow')}:{part('MLFLOW_DB_PASSWORD', '')}"
      f"@{os.environ['MLFLOW_DB_HOST']}:{part('MLFLOW_DB_PORT', '5432')}/{part('MLFLOW_DB_NAME', 'mlflow')}")
EOF
)
  unset MLFLOW_DB_PASSWORD
fi
[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ] || die "MLFLOW_BACKEND_STORE_URI is not set — set it to postgresql+psycopg2://ROLE:PASSWORD@HOST:PORT/DB (.ci/postgres prints one)"
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://*|postgresql+*://*) ;;
  *) die "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (got scheme '${MLFLOW_BACKEND_STORE_URI%%:*}')" ;;
esac
admin_user=${MLFLOW_ADMIN_USERNAME:-admin}
[[ $admin_user =~ ^[A-Za-z0-9_.@-]+$ ]] || die "MLFLOW_ADMIN_USERNAME '$admin_user' may use only letters, digits and _.@-"
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "MLFLOW_PORT '$port' is not a port number"
allowed=${MLFLOW_ALLOWED_HOSTS:-"localhost,localhost:*,127.0.0.1,127.0.0.1:*"}
if [ -z "${MLFLOW_ALLOWED_HOSTS:-}" ] && [ "$host" != 127.0.0.1 ] && [ "$host" != 0.0.0.0 ] && [ "$host" != localhost ]; then
  allowed="$allowed,$host,$host:*"
fi
mlflow_bin=${MLFLOW_BIN:-mlflow}
command -v "$mlflow_bin" >/dev/null || die "'$mlflow_bin' not found — activate the venv (source .venv/bin/activate) or set MLFLOW_BIN"
# The interpreter mlflow runs under (its script's #! line), to check what the server will import.
read -r -a py < <(sed -n '1s/^#![[:space:]]*//p' "$(command -v "$mlflow_bin")")
[ ${#py[@]} -gt 0 ] || py=(python3)
# SQLAlchemy imports the URI's driver (postgresql+psycopg2:// -> psycopg2; a bare postgresql:// is
# psycopg 3 on SQLAlchemy 2.1) without connecting: a missing driver is one line here, not a traceback.
export MLFLOW_BACKEND_STORE_URI
"${py[@]}" -c 'import os, sqlalchemy; sqlalchemy.create_engine(os.environ["MLFLOW_BACKEND_STORE_URI"])' 2>/dev/null \
  || die "no database driver for ${MLFLOW_BACKEND_STORE_URI%%://*}:// next to $mlflow_bin — fix: use postgresql+psycopg2://... and pip install psycopg2-binary"

"${py[@]}" -c 'import flask_wtf' 2>/dev/null \
  || die "the basic-auth app needs Flask-WTF next to $mlflow_bin — fix: pip install 'mlflow[auth]'"

# 2. The basic-auth configuration, private to this server.
state=${MLFLOW_SERVER_STATE_DIR:-}
own_state=
if [ -z "$state" ]; then
  state=$(mktemp -d "${TMPDIR:-/tmp}/hvdkit-mlflow.XXXXXX")
  own_state=1
fi
mkdir -p "$state"
chmod 700 "$state"
ini=$state/basic_auth.ini
auth_db=${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}
(
  umask 077
  # MLflow reads the file with configparser, where % starts an interpolation: written as %%.
  cat >"$ini" <<EOF
[mlflow]
default_permission = READ
database_uri = ${auth_db//\%/%%}
admin_username = $admin_user
admin_password = ${MLFLOW_ADMIN_PASSWORD//\%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
)
export MLFLOW_AUTH_CONFIG_PATH=$ini
# The ini is the one source of the admin credentials (these would override it).
unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_ADMIN_PASSWORD
if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi
# MLflow's job runner (GenAI scorers, trace archival: a pool of huey consumers) is of no use for
# training runs; off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}
unset MLFLOW_ARTIFACTS_DESTINATION

echo "mlflow/server.sh: serving on http://$host:$port (basic auth, admin user '$admin_user'; allowed hosts $allowed; artifacts $artifacts)" >&2
# 3. Run it; SIGTERM/SIGINT (docker stop, Ctrl-C, kill) go to MLflow, and the state directory
#    (it holds the admin password) is removed once MLflow has exited, if this script created it.
"$mlflow_bin" server \
  --app-name basic-auth \
  --host "$host" --port "$port" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "$allowed" \
  --serve-artifacts --artifacts-destination "$artifacts" \
  "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT HUP
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do  # a signal interrupted wait: MLflow is still shutting down
  rc=0
  wait "$child" || rc=$?
done
[ -n "$own_state" ] && rm -rf "$state"
exit "$rc"
