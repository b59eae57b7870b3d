#!/usr/bin/env bash
# Runs a command with a service up (`infra/<service>.sh up|down|status`: localstack, kafka);
# stops the service afterwards if this script started it.
#   infra/with-service.sh kafka cargo bench ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
service="$ROOT/infra/$1.sh"
shift
started=""
if ! "$service" status >/dev/null 2>&1; then
  "$service" up
  started=1
fi
cleanup() { if [ -n "$started" ]; then "$service" down; fi; }
trap cleanup EXIT
"$@"
