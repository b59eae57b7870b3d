#!/usr/bin/env bash
# Runs a command with LocalStack up; stops LocalStack afterwards if this script started it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
started=""
if ! "$ROOT/infra/localstack.sh" status >/dev/null 2>&1; then
  "$ROOT/infra/localstack.sh" up
  started=1
fi
cleanup() { if [ -n "$started" ]; then "$ROOT/infra/localstack.sh" down; fi; }
trap cleanup EXIT
"$@"
