#!/usr/bin/env bash
# Pull function benchmark (BENCHMARKS.md): the release kinesis-rollup binary under the shared
# runtime_api.py tool on 21 consecutive 10,000-record batches, next to a floor function that
# skips the event unparsed, in the same run. Needs ../shared/tools (or SHARED_TOOLS=dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${SHARED_TOOLS:-$ROOT/../shared/tools}"
[ -f "$TOOLS/runtime_api.py" ] || { echo "runtime_api.py not found in $TOOLS (set SHARED_TOOLS)" >&2; exit 1; }
cd "$ROOT"
cargo build --quiet --release -p kinesis-rollup -p pushpull-tests --bin kinesis-rollup --bin bench-floor
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 "$TOOLS/make_bench_events.py" "$WORK" 21
events=()
for k in $(seq -w 0 20); do events+=(--event "$WORK/kinesis-10000-b$k.json"); done
run() { # name, then command
  local name="$1"; shift
  rm -rf "$WORK/out" "$WORK/cp"
  printf '%s ' "$name"
  GROUP_BY_FIELD=user SUM_FIELD=amount OUTPUT_URI="file://$WORK/out" CHECKPOINT_URI="file://$WORK/cp" RUST_LOG=warn \
    python3 "$TOOLS/runtime_api.py" --invocations 20 "${events[@]}" -- "$@"
}
for round in 1 2 3; do
  echo "round $round"
  run floor target/release/bench-floor
  run kinesis-rollup target/release/kinesis-rollup
done
# The rollup's output must be complete: 21 batches of 10,000 records, 1,000 users.
