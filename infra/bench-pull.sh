#!/usr/bin/env bash
# Pull function benchmark (BENCHMARKS.md): the release kinesis-rollup binary under the shared
# runtime_api.py tool on 21 consecutive 10,000-record batches, next to a floor function that
# skips the event unparsed, in the same run; then the same lines packed 100 to a KPL aggregate
# (100 Kinesis records a batch), rollup and floor alike; the same lines as Kafka events (one
# partition, as the Kafka mapping sends them), rollup and floor alike; the plain rollup with its EMF metrics
# off (POWERTOOLS_METRICS_DISABLED), for what they cost. The rollup runs as the template deploys
# it at ParallelizationFactor 1 (ROLLUP_POSITIONS=per-shard), and once more with per-key
# positions (what the template sets above factor 1, and the rollup's default without it: a
# checkpoint entry per partition key and a write-ahead note, two checkpoint writes a batch), for
# what they cost. BASELINE_BIN=<a kinesis-rollup binary> adds it to every round beside this tree's
# (an A/B in one run: build the baseline from an earlier commit in a worktree). Needs
# ../shared/tools (or SHARED_TOOLS=dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${SHARED_TOOLS:-$ROOT/../shared/tools}"
[ -f "$TOOLS/runtime_api.py" ] || { echo "runtime_api.py not found in $TOOLS (set SHARED_TOOLS)" >&2; exit 1; }
cd "$ROOT"
cargo build --quiet --release -p kinesis-rollup -p pushpull-tests --bin kinesis-rollup --bin bench-floor --bin aggregate-events --bin kafka-events
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 "$TOOLS/make_bench_events.py" "$WORK" 21
events=()
aggregated=()
kafka=()
for k in $(seq -w 0 20); do
  events+=(--event "$WORK/kinesis-10000-b$k.json")
  target/release/aggregate-events "$WORK/kinesis-10000-b$k.json" "$WORK/aggregated-10000-b$k.json" 100
  aggregated+=(--event "$WORK/aggregated-10000-b$k.json")
  target/release/kafka-events "$WORK/kinesis-10000-b$k.json" "$WORK/kafka-10000-b$k.json" $((10#$k * 10000))
  kafka+=(--event "$WORK/kafka-10000-b$k.json")
done
run() { # name, events array name, then command
  local name="$1" list="$2[@]"; shift 2
  rm -rf "$WORK/out" "$WORK/cp"
  { printf '%s ' "$name"
    GROUP_BY_FIELD=user SUM_FIELD=amount OUTPUT_URI="file://$WORK/out" CHECKPOINT_URI="file://$WORK/cp" RUST_LOG=warn \
      ROLLUP_POSITIONS="${ROLLUP_POSITIONS:-per-shard}" \
      python3 "$TOOLS/runtime_api.py" --invocations 20 "${!list}" -- "$@"; } | tee -a "$WORK/results"
}
# The rollup's output must be complete: 21 batches of 10,000 lines, 1,000 users.
check_output() {
  python3 - "$WORK/out" <<'PY'
import json, pathlib, sys
rows = [json.loads(l) for f in pathlib.Path(sys.argv[1]).rglob("*.ndjson") for l in f.read_text().splitlines()]
count, users = sum(r["count"] for r in rows), len({r["key"] for r in rows})
assert (count, users) == (210000, 1000), f"rollup incomplete: {count} lines, {users} users"
PY
}
for round in 1 2 3; do
  echo "round $round" | tee -a "$WORK/results"
  run floor events target/release/bench-floor
  # With and without its EMF metrics (on by default): what the metrics cost. The two swap places
  # from round to round, so that neither is always the one run right after the floor.
  on() { run kinesis-rollup events target/release/kinesis-rollup; check_output; }
  off() { POWERTOOLS_METRICS_DISABLED=true run kinesis-rollup-no-metrics events target/release/kinesis-rollup; check_output; }
  key() { ROLLUP_POSITIONS=per-key run kinesis-rollup-per-key events target/release/kinesis-rollup; check_output; }
  base() { if [ -n "${BASELINE_BIN:-}" ]; then run kinesis-rollup-baseline events "$BASELINE_BIN"; check_output; fi; }
  if [ $((round % 2)) = 1 ]; then on; base; off; key; else key; off; base; on; fi
  run floor-aggregated aggregated target/release/bench-floor
  run kinesis-rollup-aggregated aggregated target/release/kinesis-rollup
  check_output
  # The same lines as a Kafka mapping's SelfManagedKafka events (one partition, offsets in order).
  run floor-kafka kafka target/release/bench-floor
  run kinesis-rollup-kafka kafka target/release/kinesis-rollup
  check_output
done
# Each round's warm medians as ratios to the floor of the same round (BENCHMARKS.md's tables).
python3 - "$WORK/results" <<'PY'
import json, sys
rounds = []
for line in open(sys.argv[1]):
    if line.startswith("round "):
        rounds.append({})
    elif line.strip():
        name, result = line.split(" ", 1)
        rounds[-1][name] = json.loads(result)
base = "kinesis-rollup-baseline" in rounds[0]
print("round | floor ms | rollup ms | ratio | init ms | peak RSS MiB | metrics off ms | ratio | per-key ms | ratio | aggregated: floor ms | rollup ms | ratio | peak RSS MiB | Kafka events: floor ms | rollup ms | ratio" + (" | baseline ms | ratio" if base else ""))
for i, r in enumerate(rounds, 1):
    warm = lambda n: r[n]["warm_median_ms"]
    print(" | ".join(str(x) for x in [
        i, warm("floor"), warm("kinesis-rollup"), f'{warm("kinesis-rollup") / warm("floor"):.2f}',
        r["kinesis-rollup"]["init_ms"], r["kinesis-rollup"]["peak_rss_mib"],
        warm("kinesis-rollup-no-metrics"), f'{warm("kinesis-rollup-no-metrics") / warm("floor"):.2f}',
        warm("kinesis-rollup-per-key"), f'{warm("kinesis-rollup-per-key") / warm("floor"):.2f}',
        warm("floor-aggregated"), warm("kinesis-rollup-aggregated"),
        f'{warm("kinesis-rollup-aggregated") / warm("floor-aggregated"):.2f}', r["kinesis-rollup-aggregated"]["peak_rss_mib"],
        warm("floor-kafka"), warm("kinesis-rollup-kafka"), f'{warm("kinesis-rollup-kafka") / warm("floor-kafka"):.2f}']
        + ([warm("kinesis-rollup-baseline"), f'{warm("kinesis-rollup-baseline") / warm("floor"):.2f}'] if base else [])))
PY
