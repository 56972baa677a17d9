#!/usr/bin/env bash
# Runs once, on the first start of the postgres container (empty data volume), from
# /docker-entrypoint-initdb.d. Creates one role and one database per service, so MLflow
# and Prefect never share credentials or schemas:
#   mlflow  -> database "mlflow"  (MLflow tracking + model registry)
#   prefect -> database "prefect" (Prefect server)
# Passwords come from the environment (infra/.env via docker-compose.yml).
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD must be set}"

# psql's :'var' interpolation quotes the passwords as SQL literals.
psql -v ON_ERROR_STOP=1 \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v mlflow_password="$MLFLOW_DB_PASSWORD" \
     -v prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;

CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
SQL
