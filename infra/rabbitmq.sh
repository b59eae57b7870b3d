#!/usr/bin/env bash
# The RabbitMQ broker the RabbitMQ tests and pipeline run against: Debian's rabbitmq-server,
# started by this script as a node of its own (its own name, data and logs under PUSHPULL_HOME),
# every listener on 127.0.0.1: AMQP, Erlang's distribution port and its port mapper (epmd).
#
#   infra/rabbitmq.sh install   apt-get install rabbitmq-server if missing (as root; otherwise it
#                               says the one command to run), never letting the package start it
#   infra/rabbitmq.sh up        start a fresh node on 127.0.0.1:$RABBITMQ_PORT (5672): virtual
#                               host `pushpull`, user `pushpull` / `pushpull`; prints its pid
#   infra/rabbitmq.sh down      stop the node this script started, and its epmd
#   infra/rabbitmq.sh status    exit 0 if the node this script started is running and answers
#   infra/rabbitmq.sh url       the AMQP URL a client uses (credentials and virtual host included)
#   infra/rabbitmq.sh close-connections
#                               the broker closes every client connection (realism: a cut)
#   infra/rabbitmq.sh restart-app
#                               the broker stops and starts again (rabbitmqctl stop_app,
#                               start_app): connections closed, unacknowledged messages requeued,
#                               durable queues and persistent messages kept (realism: a restart)
#
# Ports: AMQP $RABBITMQ_PORT; distribution $RABBITMQ_PORT + 20000 (RabbitMQ's own rule); epmd
# $RABBITMQ_PORT + 20001 (not 4369: a user's own Erlang nodes keep theirs). No plugin is enabled
# (the management plugin would listen on 15672). A node's data is new at every `up`.
set -euo pipefail
PUSHPULL_HOME="${PUSHPULL_HOME:-${XDG_CACHE_HOME:-${HOME:-.}/.cache}/pushpull}"
PORT="${RABBITMQ_PORT:-5672}"
DIST_PORT=$((PORT + 20000))
EPMD_PORT=$((PORT + 20001))
RUN="$PUSHPULL_HOME/rabbitmq-$PORT"
NODE="pushpull-$PORT@localhost"
SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
say() { echo "[rabbitmq] $*" >&2; }

install() {
  [ -x "$SERVER" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "error: rabbitmq-server is not installed. Run: sudo apt-get install -y rabbitmq-server"
    exit 1
  fi
  say "installing Debian's rabbitmq-server (about a minute)"
  # The package's scripts would start a node listening on every interface: refused, for the
  # install only (an existing policy stays as it is).
  local policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    # Removed however the install ends (it would block every service start on the machine).
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server >&2; }
  [ -x "$SERVER" ] || { say "error: the install left no $SERVER"; exit 1; }
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

# The pid in the pid file (the server script, leader of the node's process group), if it is still
# the one this script started: its group holds the Erlang VM whose home is this node's directory.
ours() {
  [ -f "$RUN/pid" ] || return 1
  local pid member
  pid="$(cat "$RUN/pid")"
  for member in $(pgrep -g "$pid" 2>/dev/null); do
    if tr '\0' ' ' <"/proc/$member/cmdline" 2>/dev/null | grep -q -- "-home $RUN "; then echo "$pid"; return 0; fi
  done
  return 1
}

# The environment of everything Erlang this script runs: the node, its files, its ports.
node_env() {
  export HOME="$RUN" RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$PORT" \
    RABBITMQ_DIST_PORT="$DIST_PORT" ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_MNESIA_BASE="$RUN/mnesia" RABBITMQ_LOG_BASE="$RUN/log" RABBITMQ_CONFIG_FILE="$RUN/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RUN/enabled_plugins" RABBITMQ_PID_FILE="$RUN/node.pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

up() {
  install
  if answers; then say "something already answers on 127.0.0.1:$PORT (set RABBITMQ_PORT to another port)"; exit 1; fi
  rm -rf "$RUN/mnesia" "$RUN/log"
  mkdir -p "$RUN/log"
  echo "[]." >"$RUN/enabled_plugins"
  cat >"$RUN/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$PORT
loopback_users = none
default_vhost = pushpull
default_user = pushpull
default_pass = pushpull
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
EOF
  (
    node_env
    cd "$RUN"
    setsid "$SERVER" >"$RUN/log/server.out" 2>&1 &
    echo $! >"$RUN/pid"
  )
  for _ in $(seq 1 600); do
    if answers; then say "RabbitMQ node $NODE on 127.0.0.1:$PORT (pid $(cat "$RUN/pid"), logs $RUN/log)"; return 0; fi
    if ! kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  say "error: RabbitMQ did not answer on 127.0.0.1:$PORT:"
  tail -20 "$RUN/log/server.out" >&2 || true
  down
  exit 1
}

down() {
  local pid
  if pid="$(ours)"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/pid"
  # The node's epmd outlives it (it daemonises itself): stopped by its port, ours alone.
  local epmd
  for epmd in $(pgrep -x epmd 2>/dev/null); do
    if tr '\0' '\n' <"/proc/$epmd/environ" 2>/dev/null | grep -qx "ERL_EPMD_PORT=$EPMD_PORT"; then
      kill -TERM "$epmd" 2>/dev/null || true
    fi
  done
}

ctl() { ( node_env; cd "$RUN"; /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$NODE" "$@" ) }

status() {
  if ours >/dev/null && answers; then return 0; fi
  if answers; then say "127.0.0.1:$PORT answers, but not with the node this script started"; fi
  return 1
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  url) echo "amqp://pushpull:pushpull@127.0.0.1:$PORT/pushpull" ;;
  close-connections) ctl close_all_connections "pushpull realism: connection closed" ;;
  restart-app)
    ctl stop_app
    # start_app can fail on a loaded machine (the CLI's own timeout): tried again, 30 s at most.
    for _ in $(seq 1 30); do ctl start_app && exit 0; sleep 1; done
    say "error: the node did not start its application again"; exit 1 ;;
  *) echo "usage: $0 install|up|down|status|url|close-connections|restart-app" >&2; exit 2 ;;
esac
