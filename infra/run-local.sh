#!/usr/bin/env bash
# README command 1: set up what is missing, then run the sample pipeline on LocalStack.
# Extra arguments go to `pushpull-local run` (e.g. --input-dir DIR, --keep-running, --verbose).
# LocalStack is stopped at the end if this script started it (KEEP_RUNNING=1 leaves it up).
# With --broker kafka the Kafka broker is started too (`infra/kafka.sh`: built once, about 12
# minutes the first time), with --broker rabbitmq the RabbitMQ broker (`infra/rabbitmq.sh`:
# Debian's package, installed once), with --broker redis-streams or redis-pubsub a Redis server
# (`infra/redis.sh`: Debian's package, installed once), and stopped likewise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
kafka=""
rabbitmq=""
redis=""
prev=""
for a in "$@"; do
  if [ "$a" = "--broker=kafka" ] || { [ "$prev" = "--broker" ] && [ "$a" = "kafka" ]; }; then kafka=1; fi
  if [ "$a" = "--broker=rabbitmq" ] || { [ "$prev" = "--broker" ] && [ "$a" = "rabbitmq" ]; }; then rabbitmq=1; fi
  case "$a" in --broker=redis-*) redis=1 ;; redis-*) if [ "$prev" = "--broker" ]; then redis=1; fi ;; esac
  prev="$a"
done
started=""
kafka_started=""
rabbitmq_started=""
redis_started=""
cleanup() {
  if [ -n "${KEEP_RUNNING:-}" ]; then return; fi
  if [ -n "$kafka_started" ]; then infra/kafka.sh down; fi
  if [ -n "$rabbitmq_started" ]; then infra/rabbitmq.sh down; fi
  if [ -n "$redis_started" ]; then infra/redis.sh down; fi
  if [ -n "$started" ]; then infra/localstack.sh down; fi
}
trap cleanup EXIT
if [ -n "$kafka" ] && ! infra/kafka.sh status >/dev/null 2>&1; then
  infra/kafka.sh up
  kafka_started=1
fi
if [ -n "$rabbitmq" ] && [ -z "${RABBITMQ_URL:-}" ] && ! infra/rabbitmq.sh status >/dev/null 2>&1; then
  infra/rabbitmq.sh up
  rabbitmq_started=1
fi
if [ -n "$redis" ] && [ -z "${REDIS_URL:-}" ] && ! infra/redis.sh status >/dev/null 2>&1; then
  infra/redis.sh up
  redis_started=1
fi
if ! infra/localstack.sh status >/dev/null 2>&1; then
  infra/localstack.sh up
  started=1
fi
cargo build --quiet --workspace --bins
target/debug/pushpull-local run "$@"
