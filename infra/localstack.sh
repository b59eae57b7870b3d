#!/usr/bin/env bash
# LocalStack on the host, without Docker: install (idempotent), start, stop (by PID), status.
#
#   infra/localstack.sh install   # venv + kinesis-mock, once; seconds when already there
#   infra/localstack.sh up        # install if needed, start on 127.0.0.1:4566, wait until healthy
#   infra/localstack.sh down      # stop the process group we started, by its PID
#   infra/localstack.sh status
#   infra/localstack.sh aws ARGS  # the AWS CLI (from the same venv) against it: aws sqs create-queue ...
#
# Everything lives under $PUSHPULL_HOME (default ~/.cache/pushpull); nothing is downloaded from
# anywhere but PyPI and npm. Only S3, Kinesis, SQS, SNS and EventBridge are served, on 127.0.0.1 only.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PUSHPULL_HOME="${PUSHPULL_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/pushpull}"
LS_VERSION=2026.3.0
KINESIS_LOCAL_VERSION=0.5.2
VENV="$PUSHPULL_HOME/localstack-$LS_VERSION"
STATE="$PUSHPULL_HOME/localstack-state"
PIDFILE="$PUSHPULL_HOME/localstack.pid"
LOG="$PUSHPULL_HOME/localstack.log"
PORT="${LOCALSTACK_PORT:-4566}"
ENDPOINT="http://127.0.0.1:$PORT"

log() { printf '[localstack] %s\n' "$*" >&2; }
die() { printf '[localstack] error: %s\n' "$*" >&2; exit 1; }

find_python() {
  # LocalStack 2026.3 needs Python >= 3.12 (3.11 fails with a SyntaxError in stores.py).
  local c
  for c in "${LOCALSTACK_PYTHON:-}" python3.13 python3.12 \
           "$HOME/.pyenv/versions/3.13.0/bin/python3" /root/.pyenv/versions/3.13.0/bin/python3 \
           $(ls -d "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null) python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

install() {
  mkdir -p "$PUSHPULL_HOME"
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import localstack, rolo, moto, hypercorn' 2>/dev/null; then
    local py
    py="$(find_python)" || die "LocalStack needs Python >= 3.12 and none was found (tried python3.13, python3.12, pyenv 3.12+; set LOCALSTACK_PYTHON)"
    log "creating venv with $py ($("$py" --version 2>&1))"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # Pinned: an unpinned install crashes (cbor2 6.x, pyOpenSSL 26.x).
    "$VENV/bin/pip" install --quiet -c "$HERE/localstack-constraints.txt" "localstack-core[runtime]==$LS_VERSION"
  fi
  # kinesis-mock, installed where LocalStack looks for it, so that we can make it bind 127.0.0.1
  # (it has no setting for its bind host).
  local kl="$STATE/var/lib/localstack/lib/kinesis-local/$KINESIS_LOCAL_VERSION"
  if [ ! -f "$kl/node_modules/kinesis-local/main.js" ]; then
    command -v npm >/dev/null || die "npm is needed for kinesis-mock (Node.js 20)"
    log "installing kinesis-local@$KINESIS_LOCAL_VERSION"
    mkdir -p "$kl"
    npm install --silent --no-audit --no-fund --prefix "$kl" "kinesis-local@$KINESIS_LOCAL_VERSION" >/dev/null
  fi
  sed -i 's/"0\.0\.0\.0"/"127.0.0.1"/g' "$kl/node_modules/kinesis-local/main.js"
  grep -q '"0\.0\.0\.0"' "$kl/node_modules/kinesis-local/main.js" && die "could not patch kinesis-mock bind host"
  return 0
}

healthy() {
  local health
  health="$(curl -fsS --max-time 2 "$ENDPOINT/_localstack/health" 2>/dev/null)" || return 1
  grep -q '"kinesis"' <<<"$health"
}

running_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid; pid="$(cat "$PIDFILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

up() {
  if pid="$(running_pid)" && healthy; then log "already running (pid $pid) at $ENDPOINT"; return 0; fi
  if healthy; then die "something else already serves $ENDPOINT (not started by this script)"; fi
  install
  mkdir -p "$STATE"
  log "starting on $ENDPOINT (log: $LOG)"
  # setsid: its own process group, so that `down` stops LocalStack and kinesis-mock together.
  env GATEWAY_LISTEN="127.0.0.1:$PORT" GATEWAY_SERVER=hypercorn LOCALSTACK_HOST="127.0.0.1:$PORT" \
      SERVICES=s3,kinesis,sqs,sns,events,secretsmanager OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$STATE" DNS_ADDRESS=0 \
      DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 KINESIS_MOCK_PROVIDER_ENGINE=node \
      KINESIS_LATENCY="${KINESIS_LATENCY:-100}" KINESIS_PERSISTENCE=0 KINESIS_SHARD_LIMIT=100000 \
      setsid "$VENV/bin/python" -m localstack.runtime.main >"$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  local i
  for i in $(seq 1 120); do
    if healthy; then break; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -n 40 "$LOG" >&2; die "LocalStack exited during start"; }
    sleep 0.5
  done
  healthy || { tail -n 40 "$LOG" >&2; die "LocalStack not healthy after 60 s"; }
  # The first Kinesis call starts kinesis-mock (2-3 s): do it now, not inside a test.
  local ok=""
  for i in $(seq 1 60); do
    if curl -fsS --max-time 5 -X POST "$ENDPOINT/" \
         -H 'Content-Type: application/x-amz-json-1.1' -H 'X-Amz-Target: Kinesis_20131202.ListStreams' \
         -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0' \
         -d '{}' >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [ -n "$ok" ] || { tail -n 40 "$LOG" >&2; die "kinesis did not answer the warm-up call"; }
  log "ready (pid $(cat "$PIDFILE"))"
}

down() {
  local pid
  if pid="$(running_pid)"; then
    log "stopping pid $pid and its process group"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) if pid="$(running_pid)" && healthy; then echo "running (pid $pid) at $ENDPOINT"; else echo "stopped"; exit 1; fi ;;
  aws)
    shift
    [ -x "$VENV/bin/aws" ] || install
    AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}" \
      AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}" exec "$VENV/bin/aws" --endpoint-url "$ENDPOINT" "$@" ;;
  *) echo "usage: $0 install|up|down|status|aws ARGS" >&2; exit 2 ;;
esac
