#!/usr/bin/env bash
# Run once by the postgres image on a new data directory (/docker-entrypoint-initdb.d, as the
# superuser over the local socket): the role MLflow connects as is an ordinary one (no SUPERUSER,
# CREATEDB or CREATEROLE) that owns only its own database. Its password comes from
# MLFLOW_DB_PASSWORD: psql reads it from the environment (\getenv) and quotes it as a literal
# (format %L), so it is never on a command line.
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (the password of the role mlflow)}"
role=${MLFLOW_DB_USER:-mlflow}
db=${MLFLOW_DB_NAME:-mlflow}
psql -v ON_ERROR_STOP=1 -X -q --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v role="$role" -v db="$db" <<'SQL'
\getenv pw MLFLOW_DB_PASSWORD
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SQL
echo "postgres-init: role $role (ordinary) owns database $db"
