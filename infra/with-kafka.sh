#!/usr/bin/env bash
# Runs a command with the Kafka broker up (`infra/kafka.sh`); stops it afterwards if this script
# started it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
started=""
if ! "$ROOT/infra/kafka.sh" status >/dev/null 2>&1; then
  "$ROOT/infra/kafka.sh" up
  started=1
fi
cleanup() { if [ -n "$started" ]; then "$ROOT/infra/kafka.sh" down; fi; }
trap cleanup EXIT
"$@"
