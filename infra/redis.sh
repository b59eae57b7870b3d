#!/usr/bin/env bash
# The Redis server the Redis tests and pipeline run against: Debian's redis-server, started by
# this script as a server of its own (its own configuration, log and pid file under PUSHPULL_HOME),
# listening on 127.0.0.1 only.
#
#   infra/redis.sh install      apt-get install redis-server if missing (as root; otherwise it
#                               says the one command to run), never letting the package start it
#   infra/redis.sh up           start a fresh server on 127.0.0.1:$REDIS_PORT (6390); prints its pid
#   infra/redis.sh down         stop the server this script started (no other Redis is touched)
#   infra/redis.sh purge        down, and remove its directory (a test's server on a port of its own)
#   infra/redis.sh status       exit 0 if the server this script started is running and answers
#   infra/redis.sh url          the URL a client uses
#   infra/redis.sh cli ARGS...  redis-cli against that server (README steps, tests)
#   infra/redis.sh restart      the server stops and starts again on the same port (realism: a
#                               restart): connections closed, subscriptions gone, its data
#                               (streams, consumer groups) reloaded from its append-only file
#   infra/redis.sh set-pubsub-limit HARD SOFT SECONDS
#                               CONFIG SET client-output-buffer-limit "pubsub HARD SOFT SECONDS"
#                               (realism: a slow subscriber disconnected by the server)
#
# Port: $REDIS_PORT, 6390 by default, not 6379: a user's own Redis keeps its port, and so does the
# system redis-server the Debian package may start and enable despite the install's policy-rc.d.
# Persistence: an append-only file, fsynced every second (Redis's advice for durability without
# the cost of a fsync per write), no RDB snapshots; a server's data is new at every `up` and kept
# across `restart`, as a production Redis keeps its streams across a restart.
set -euo pipefail
PUSHPULL_HOME="${PUSHPULL_HOME:-${XDG_CACHE_HOME:-${HOME:-.}/.cache}/pushpull}"
PORT="${REDIS_PORT:-6390}"
RUN="$PUSHPULL_HOME/redis-$PORT"
SERVER=/usr/bin/redis-server
say() { echo "[redis] $*" >&2; }

install() {
  [ -x "$SERVER" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "error: redis-server is not installed. Run: sudo apt-get install -y redis-server"
    exit 1
  fi
  say "installing Debian's redis-server"
  # The package's scripts would start the system server on 6379: refused, for the install only
  # (an existing policy stays as it is).
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    # Removed however the install ends (it would block every service start on the machine).
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >&2; }
  [ -x "$SERVER" ] || { say "error: the install left no $SERVER"; exit 1; }
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

cli() { redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

pong() { [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = PONG ]; }

# The pid in the pid file, if it is still the server this script started: a redis-server whose
# command line names this port (its process title) or this directory's configuration.
ours() {
  [ -f "$RUN/pid" ] || return 1
  local pid cmd
  pid="$(cat "$RUN/pid")"
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  case "$cmd" in *redis-server*) ;; *) return 1 ;; esac
  if grep -qE -- "127\.0\.0\.1:$PORT( |$)|$RUN/redis\.conf( |$)" <<<"$cmd"; then echo "$pid"; return 0; fi
  return 1
}

# Starts the server in $RUN (which must exist) and waits until it answers.
start() {
  if answers; then say "something already answers on 127.0.0.1:$PORT (set REDIS_PORT to another port)"; exit 1; fi
  cat >"$RUN/redis.conf" <<EOF
bind 127.0.0.1
port $PORT
protected-mode yes
daemonize no
dir $RUN
save ""
appendonly yes
appendfsync everysec
logfile $RUN/redis.log
pidfile $RUN/redis.pid
EOF
  (
    cd "$RUN"
    setsid "$SERVER" "$RUN/redis.conf" >"$RUN/server.out" 2>&1 &
    echo $! >"$RUN/pid"
  )
  for _ in $(seq 1 300); do
    if pong; then say "Redis on 127.0.0.1:$PORT (pid $(cat "$RUN/pid"), log $RUN/redis.log)"; return 0; fi
    if ! kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  say "error: Redis did not answer on 127.0.0.1:$PORT:"
  tail -20 "$RUN/redis.log" "$RUN/server.out" >&2 2>/dev/null || true
  down
  exit 1
}

up() {
  install
  if answers; then say "something already answers on 127.0.0.1:$PORT (set REDIS_PORT to another port)"; exit 1; fi
  rm -rf "$RUN"
  mkdir -p "$RUN"
  start
}

down() {
  local pid
  if pid="$(ours)"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/pid"
}

status() {
  if ours >/dev/null && pong; then return 0; fi
  if answers; then say "127.0.0.1:$PORT answers, but not with the server this script started"; fi
  return 1
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  purge) down; rm -rf "$RUN" ;;
  status) status ;;
  url) echo "redis://127.0.0.1:$PORT/" ;;
  cli) shift; cli "$@" ;;
  restart)
    ours >/dev/null || { say "error: no server started by this script on 127.0.0.1:$PORT"; exit 1; }
    down
    mkdir -p "$RUN"
    start ;;
  set-pubsub-limit)
    [ $# = 4 ] || { echo "usage: $0 set-pubsub-limit HARD SOFT SECONDS" >&2; exit 2; }
    reply="$(cli CONFIG SET client-output-buffer-limit "pubsub $2 $3 $4")"
    [ "$reply" = OK ] || { say "error: CONFIG SET client-output-buffer-limit: $reply"; exit 1; } ;;
  *) echo "usage: $0 install|up|down|purge|status|url|cli ARGS...|restart|set-pubsub-limit HARD SOFT SECONDS" >&2; exit 2 ;;
esac
