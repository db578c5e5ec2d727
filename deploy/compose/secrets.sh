#!/usr/bin/env bash
# Every secret docker-compose.yml demands, generated into ENV_FILE (default .env, which Compose
# and Quarry's settings read) where it is not there yet: readable by its owner only (mode 600).
# `make up` runs it before `docker compose up`; run it again: what is there is kept.
set -euo pipefail
file=${1:-.env}
umask 077
touch "$file" && chmod 600 "$file"
secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
add() {  # add NAME VALUE: unless NAME is already set in the file
  grep -qs "^$1=" "$file" || echo "$1=$2" >>"$file"
}
for name in POSTGRES_PASSWORD QUARRY_DB_PASSWORD QUERY_ROLE_PASSWORD WORKER_ROLE_PASSWORD \
  DISPATCHER_ROLE_PASSWORD REDIS_PASSWORD AWS_SECRET_ACCESS_KEY NOTEBOOK_TOKEN; do
  add "$name" "$(secret)"
done
add AWS_ACCESS_KEY_ID "quarry-$(secret | cut -c1-12)"
add FLOWER_BASIC_AUTH "admin:$(secret | cut -c1-24)"
