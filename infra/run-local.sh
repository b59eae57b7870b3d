#!/usr/bin/env bash
# README command 1: set up what is missing, then run the sample pipeline on LocalStack.
# Extra arguments go to `pushpull-local run` (e.g. --input-dir DIR, --keep-running, --verbose).
# LocalStack is stopped at the end if this script started it (KEEP_RUNNING=1 leaves it up).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
started=""
if ! infra/localstack.sh status >/dev/null 2>&1; then
  infra/localstack.sh up
  started=1
fi
cleanup() { if [ -n "$started" ] && [ -z "${KEEP_RUNNING:-}" ]; then infra/localstack.sh down; fi; }
trap cleanup EXIT
cargo build --quiet --workspace --bins
target/debug/pushpull-local run "$@"
