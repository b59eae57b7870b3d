#!/usr/bin/env bash
# The Kafka-protocol broker the Kafka tests and the Kafka pipeline run against: nisshi (crates.io;
# the Kafka-compatible broker in Rust formerly called tansu), no JVM, no Docker, bound to 127.0.0.1.
#
#   infra/kafka.sh install   build it once into $PUSHPULL_HOME/nisshi-<version> (about 12 minutes
#                            on 2 cores), with the newest toolchain here that can build it
#   infra/kafka.sh up        start it on 127.0.0.1:$KAFKA_PORT (9092), memory storage; prints its pid
#   infra/kafka.sh down      stop the one this script started (by its pid file)
#   infra/kafka.sh status    exit 0 if the broker this script started is running and answers
#
# KAFKA_STORAGE_ENGINE (memory://nisshi/, or s3://BUCKET/ for brokers sharing one store) and
# KAFKA_ADVERTISED_PORT (the port clients are told to use; default KAFKA_PORT: another for brokers
# behind one forwarder, as nisshi's own multi-broker tests run them: nisshi gives every broker
# node id 111, so a client can only tell them apart by that one address).
#
# nisshi 0.8.1 needs rustc 1.96 or later (its rama 0.4 dependency). This machine's default toolchain
# may be older; any toolchain rustup has that is new enough is used (today the image's nightly).
# None: the script fails and says what to run. It is configured by environment variables
# (LISTENER_URL, ADVERTISED_LISTENER_URL, STORAGE_ENGINE), which nisshi reads whatever its flags
# are called, and started in a directory of its own holding an empty `.env` (nisshi loads the first
# `.env` it finds from where it starts upwards: the empty one stops that search).
set -euo pipefail
PUSHPULL_HOME="${PUSHPULL_HOME:-${XDG_CACHE_HOME:-${HOME:-.}/.cache}/pushpull}"
VERSION=0.8.1
NEEDS_MINOR=96
PREFIX="$PUSHPULL_HOME/nisshi-$VERSION"
BIN="$PREFIX/bin/nisshi"
PORT="${KAFKA_PORT:-9092}"
RUN="$PUSHPULL_HOME/kafka-$PORT"
say() { echo "[kafka] $*" >&2; }

# The newest rustup toolchain whose rustc is 1.$NEEDS_MINOR or later, or nothing.
toolchain() {
  local best="" best_minor=0 tc v minor
  command -v rustup >/dev/null 2>&1 || return 0
  for tc in $(rustup toolchain list 2>/dev/null | awk '{print $1}'); do
    v="$(rustup run "$tc" rustc --version 2>/dev/null | awk '{print $2}')" || continue
    [[ "$v" =~ ^1\.([0-9]+)\. ]] || continue
    minor="${BASH_REMATCH[1]}"
    if [ "$minor" -ge "$NEEDS_MINOR" ] && [ "$minor" -gt "$best_minor" ]; then best="$tc"; best_minor="$minor"; fi
  done
  echo "$best"
}

install() {
  [ -x "$BIN" ] && return 0
  local tc
  tc="$(toolchain)"
  if [ -z "$tc" ]; then
    say "error: nisshi $VERSION needs rustc 1.$NEEDS_MINOR or later, and no rustup toolchain here has it."
    say "       run: rustup toolchain install nightly   (then infra/kafka.sh install again)"
    exit 1
  fi
  say "building nisshi $VERSION with $tc into $PREFIX (once; about 12 minutes on 2 cores)"
  # A target directory of its own, kept until the build succeeds: an interrupted build resumes.
  cargo "+$tc" install "nisshi@$VERSION" --locked --no-default-features --features dynostore \
    --root "$PREFIX" --target-dir "$PUSHPULL_HOME/nisshi-build" >&2
  [ -x "$BIN" ] || { say "error: the build left no $BIN"; exit 1; }
  # Built: the intermediate files (about 1.6 GB) go; the binary is the cache.
  rm -rf "$PUSHPULL_HOME/nisshi-build"
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

# The pid in the pid file, if it is a running nisshi of this build (not a reused pid).
ours() {
  [ -f "$RUN/pid" ] || return 1
  local pid
  pid="$(cat "$RUN/pid")"
  [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$BIN")" ] && echo "$pid"
}

up() {
  install
  if answers; then say "something already answers on 127.0.0.1:$PORT (set KAFKA_PORT to another port)"; exit 1; fi
  mkdir -p "$RUN"
  : >"$RUN/.env"
  (
    cd "$RUN"
    LISTENER_URL="tcp://127.0.0.1:$PORT" ADVERTISED_LISTENER_URL="tcp://127.0.0.1:${KAFKA_ADVERTISED_PORT:-$PORT}" \
      STORAGE_ENGINE="${KAFKA_STORAGE_ENGINE:-memory://nisshi/}" RUST_LOG="${KAFKA_LOG:-warn}" \
      setsid "$BIN" broker >"$RUN/broker.log" 2>&1 &
    echo $! >"$RUN/pid"
  )
  for _ in $(seq 1 100); do
    if answers; then say "nisshi $VERSION on 127.0.0.1:$PORT (pid $(cat "$RUN/pid"), log $RUN/broker.log)"; return 0; fi
    if ! kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  say "error: nisshi did not answer on 127.0.0.1:$PORT:"; tail -20 "$RUN/broker.log" >&2 || true
  down
  exit 1
}

down() {
  local pid
  if pid="$(ours)"; then
    # Its process group (setsid made it the leader): the broker and anything it started.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/pid"
}

status() {
  if ours >/dev/null && answers; then return 0; fi
  if answers; then say "127.0.0.1:$PORT answers, but not with the broker this script started"; fi
  return 1
}

case "${1:-}" in
  install) install; echo "$BIN" ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
