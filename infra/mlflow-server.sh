#!/bin/sh
# The MLflow tracking server with auth on (MLflow's basic-auth app) and proxied artifacts, as
# compose.yaml and k8s/mlflow.yaml start it. Everything comes from the environment:
#
#   MLFLOW_BACKEND_STORE_URI      runs and registry, e.g. postgresql+psycopg2://USER:PASS@HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI      users and permissions, e.g. postgresql+psycopg2://USER:PASS@HOST/mlflow_auth
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin user's password, set the first time the server starts
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the auth app's CSRF key (the same on every replica)
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts go (a volume path, s3://..., ...)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers to accept (service names as well as localhost)
#   MLFLOW_HOST, MLFLOW_PORT      bind address (0.0.0.0 in a container) and port (5000)
#
# MLflow reads the auth settings from an ini at MLFLOW_AUTH_CONFIG_PATH; it is written here, at
# start, so that the auth database's password lives only in the environment. The admin password
# is never in the file: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD itself and has no default.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://...)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (postgresql+psycopg2://...)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION}"

MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-auth/basic_auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
umask 077
# READ by default: every signed-in user can browse; writing needs a grant (or the admin).
printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = %s\n' \
    "$MLFLOW_AUTH_DATABASE_URI" "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" > "$MLFLOW_AUTH_CONFIG_PATH"

exec mlflow server \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" \
    --serve-artifacts \
    --app-name basic-auth \
    "$@"
