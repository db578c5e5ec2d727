#!/usr/bin/env bash
# The stack as local processes, for machines without a Docker engine: PostgreSQL and Redis (the
# machine's where they answer, else embedded ones from pip wheels: producer/embedded.py), an S3
# server where none answers (the JuiceFS gateway: producer/s3_gateway.py), the dispatcher, the three pools, Flower and JupyterLab on examples/ (its URL, with a
# token kept in RUN_DIR/notebook-token, is the last line `up` prints).
# Secrets it needs and is not given (an embedded Redis's password, the local S3 server's keys) are
# generated into QUARRY_ENV_FILE (default .env, mode 600), which every Quarry process reads;
# everything it writes is its user's alone (umask 077: files 600, folders 700).
# Usage: deploy/local/stack.sh up|down|status. Honours DATABASE_URL, CELERY_BROKER_URL,
# S3_ENDPOINT_URL, RAW_BUCKET, OUTPUT_BUCKET; QUARRY_RUN_DIR (pids, logs), FLOWER_PORT,
# NOTEBOOK_PORT, TRANSFORM_CONCURRENCY, UPLOAD_CONCURRENCY, INFERENCE_CONCURRENCY.
# More worker nodes: `stack.sh node-up NAME` starts another set of the three pools, as a node of
# its own (worker names POOL.NAME@host, pids and logs in RUN_DIR/nodes/NAME) on the same
# PostgreSQL, Redis and S3; `stack.sh node-down NAME` stops it; `up`/`down` leave nodes alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
umask 077
QUARRY_ENV_FILE=${QUARRY_ENV_FILE-.env}  # set empty: no env file
# absolute: the notebook's kernel runs in examples/
[ -z "$QUARRY_ENV_FILE" ] || QUARRY_ENV_FILE=$(realpath -m "$QUARRY_ENV_FILE")
export QUARRY_ENV_FILE
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
RUN_DIR=${QUARRY_RUN_DIR:-.run}
# worker names are POOL.STACK@host: STACK from the run dir's name, letters and digits only (".run" -> "run")
STACK=${QUARRY_STACK:-$(basename "$RUN_DIR" | tr -c 'a-zA-Z0-9\n' '-' | sed -E 's/^-+//; s/-+$//')}
STACK=${STACK:-local}
FLOWER_PORT=${FLOWER_PORT:-5555}
NOTEBOOK_PORT=${NOTEBOOK_PORT:-8888}
S3_ENDPOINT_URL=${S3_ENDPOINT_URL:-http://127.0.0.1:9000}
export S3_ENDPOINT_URL
mkdir -p "$RUN_DIR" && chmod 700 "$RUN_DIR"

running() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

start() {  # start NAME CMD...: run in the background, pid and log in RUN_DIR
  local name=$1; shift
  if running "$name"; then echo "  $name already running"; return; fi
  nohup "$@" >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}

answers() {  # answers URL: anything answers HTTP there (a real S3 server's 403 is an answer)
  "$PY" -c "import sys; from producer.s3_gateway import answers; sys.exit(0 if answers(sys.argv[1]) else 1)" "$1"
}

wait_for_url() {  # wait_for_url URL [TRIES]: 0.2 s apart
  for _ in $(seq 1 "${2:-50}"); do
    answers "$1" && return 0
    sleep 0.2
  done
  echo "no answer from $1" >&2; return 1
}

up() {
  QUARRY_RUN_DIR="$RUN_DIR" "$PY" -m producer.embedded up || exit 1
  if ! answers "$S3_ENDPOINT_URL"; then  # a local server only where nothing answers
    # the JuiceFS gateway (MinIO's S3 API) on a volume in RUN_DIR/s3, with the settings' keys
    start s3 "$PY" -m producer.s3_gateway serve "$RUN_DIR/s3"
    wait_for_url "$S3_ENDPOINT_URL" 150 || { echo "the local S3 server did not start: $RUN_DIR/s3.log" >&2; exit 1; }
  fi
  "$BIN/producer" init
  start_pools "$STACK"
  start dispatcher "$BIN/producer" dispatch
  start flower "$BIN/celery" -A workers flower --address=127.0.0.1 --port="$FLOWER_PORT"
  wait_for_pools "$STACK"
  echo "Quarry is up: S3 at $S3_ENDPOINT_URL, Flower at http://127.0.0.1:$FLOWER_PORT, logs in $RUN_DIR/"
  start_notebook || true  # the stack runs without it; what went wrong is on stderr
}

start_notebook() {  # JupyterLab on examples/, with the stack's settings; prints its URL
  if [ ! -x "$BIN/jupyter-lab" ]; then
    echo "no notebook: JupyterLab is not installed in $(dirname "$BIN") (make install)" >&2; return 1
  fi
  [ -s "$RUN_DIR/notebook-token" ] || "$PY" -c "import secrets; print(secrets.token_hex(24))" >"$RUN_DIR/notebook-token"
  local token root=()
  token=$(cat "$RUN_DIR/notebook-token")
  [ "$(id -u)" = 0 ] && root=(--allow-root)
  start notebook env JUPYTER_TOKEN="$token" JUPYTER_RUNTIME_DIR="$RUN_DIR/jupyter" \
    "$BIN/jupyter-lab" --no-browser --ip=127.0.0.1 --port="$NOTEBOOK_PORT" --ServerApp.port_retries=0 \
    --ServerApp.root_dir=examples "${root[@]}"
  wait_for_url "http://127.0.0.1:$NOTEBOOK_PORT/api/status?token=$token" 150 \
    || { echo "JupyterLab did not start: $RUN_DIR/notebook.log" >&2; return 1; }
  echo "Notebook at http://127.0.0.1:$NOTEBOOK_PORT/lab/tree/quickstart.ipynb?token=$token"
}

start_pools() {  # start_pools NODE: the three pools, named POOL.NODE@host
  start worker-transform "$BIN/celery" -A workers worker -Q transform -n "transform.$1@%h" \
    --pool prefork --concurrency "${TRANSFORM_CONCURRENCY:-2}" --loglevel INFO
  start worker-upload "$BIN/celery" -A workers worker -Q upload -n "upload.$1@%h" \
    --pool threads --concurrency "${UPLOAD_CONCURRENCY:-16}" --loglevel INFO
  start worker-inference "$BIN/celery" -A workers worker -Q inference -n "inference.$1@%h" \
    --pool prefork --concurrency "${INFERENCE_CONCURRENCY:-1}" --loglevel INFO
}

wait_for_pools() {  # wait_for_pools NODE: until each pool answers a ping
  for pool in transform upload inference; do
    for _ in $(seq 1 60); do
      "$BIN/celery" -A workers inspect ping -d "$pool.$1@$(hostname)" -t 1 >/dev/null 2>&1 && break
      sleep 0.5
    done
  done
}

stop() {  # stop NAME: TERM (warm shutdown), KILL after 10 s
  if running "$1"; then
    kill -TERM "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do running "$1" || break; sleep 0.2; done
    running "$1" && kill -KILL "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null || true
  fi
  rm -f "$RUN_DIR/$1.pid"
}

node_name() {  # a node's name: letters, digits and dashes
  [[ "${1:-}" =~ ^[a-zA-Z0-9-]+$ ]] || { echo "a node needs a name of letters, digits and dashes: stack.sh node-up NAME" >&2; exit 2; }
}

node-up() {
  node_name "${1:-}"
  RUN_DIR="$RUN_DIR/nodes/$1"; mkdir -p "$RUN_DIR" && chmod 700 "$RUN_DIR"
  start_pools "$1"
  wait_for_pools "$1"
  echo "node $1 is up: pools transform.$1, upload.$1, inference.$1 @$(hostname), logs in $RUN_DIR/"
}

node-down() {
  node_name "${1:-}"
  RUN_DIR="$RUN_DIR/nodes/$1"
  for name in worker-inference worker-upload worker-transform; do stop "$name"; done
  echo "node $1 is down"
}

down() {
  for name in notebook flower dispatcher worker-inference worker-upload worker-transform s3; do stop "$name"; done
  QUARRY_RUN_DIR="$RUN_DIR" "$PY" -m producer.embedded down
  echo "Quarry is down"
}

status() {
  for name in s3 dispatcher worker-transform worker-upload worker-inference flower notebook; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN_DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
  for name in postgresql redis; do
    [ -f "$RUN_DIR/embedded-$name" ] && echo "$name: embedded, data in $RUN_DIR"
  done
  return 0
}

case "${1:-status}" in
  up|down|status) "${1:-status}" ;;
  node-up|node-down) "$1" "${2:-}" ;;
  *) echo "usage: stack.sh up|down|status|node-up NAME|node-down NAME" >&2; exit 2 ;;
esac
