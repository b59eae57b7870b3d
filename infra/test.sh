#!/usr/bin/env bash
# README command 2 (and what CI runs): set up what is missing, then run every check and test.
# 1. the template checks; the library feature by feature and packaged as for crates.io
#    (`infra/check-library.sh`); the functions built as `sam build` builds them, refusing every
#    fault injection (`infra/check-deployed-build.sh`); and the deployable arm64 zips
#    (SKIP_LAMBDA_BUILD=1 skips the zips);
# 2. LocalStack up, the Kafka broker (`infra/kafka.sh`: nisshi, built once into PUSHPULL_HOME,
#    about 12 minutes the first time) and the RabbitMQ broker (`infra/rabbitmq.sh`: Debian's
#    rabbitmq-server, installed with apt if missing), each stopped again at the end if this script
#    started it; Debian's redis-server installed if missing (each Redis test starts its own);
# 3. doc tests, then every unit, example and integration test with cargo-nextest (the
#    integration tests are the `integration` feature of pushpull-tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "[test] installing cargo-nextest from crates.io" >&2
  cargo install --locked cargo-nextest
fi
# Each step's time, so that a run near CI's limit says where the time went.
phase_start=$SECONDS
phase() {
  echo "[test] $1: $((SECONDS - phase_start)) s" >&2
  phase_start=$SECONDS
}
infra/check-template.sh
phase "template checks"
infra/check-library.sh
phase "library feature by feature"
infra/check-deployed-build.sh
phase "deployed build"
if [ -z "${SKIP_LAMBDA_BUILD:-}" ]; then infra/build-lambda.sh; phase "lambda zips"; fi
# The broker's build (once, about 12 minutes) before LocalStack starts, so that nothing idles.
infra/kafka.sh status || infra/kafka.sh install >/dev/null
infra/rabbitmq.sh install
# The Redis tests start servers of their own (Debian's redis-server, installed with apt if missing).
infra/redis.sh install
phase "brokers installed"
started=""
kafka_started=""
rabbitmq_started=""
cleanup() {
  if [ -n "$rabbitmq_started" ]; then infra/rabbitmq.sh down; fi
  if [ -n "$kafka_started" ]; then infra/kafka.sh down; fi
  if [ -n "$started" ]; then infra/localstack.sh down; fi
}
trap cleanup EXIT
if ! infra/localstack.sh status >/dev/null 2>&1; then
  infra/localstack.sh up
  started=1
fi
if ! infra/kafka.sh status; then
  infra/kafka.sh up
  kafka_started=1
fi
if ! infra/rabbitmq.sh status; then
  infra/rabbitmq.sh up
  rabbitmq_started=1
fi
phase "services up"
cargo build --workspace --bins --features pushpull-tests/integration
phase "workspace build"
log="$(mktemp)"
set +e
cargo test --workspace --doc 2>&1 | tee "$log"
doc_rc=${PIPESTATUS[0]}
phase "doc tests"
cargo nextest run --workspace --features pushpull-tests/integration --no-fail-fast 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
phase "nextest"
set -e
cleanup
trap - EXIT
# One closing line for both runners: doc tests ("test result: ok. N passed; M failed") and
# nextest ("N tests run: P passed, F failed").
passed=0; failed=0
while read -r p f; do passed=$((passed + p)); failed=$((failed + f)); done < <(
  sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$log"
  # nextest: "112 tests run: 111 passed (5 slow), 1 failed, 0 skipped"; the parts vary.
  grep -E '[0-9]+ tests? run: ' "$log" | tail -n 1 | awk '{
    p = 0; f = 0
    if (match($0, /[0-9]+ passed/)) p = substr($0, RSTART, RLENGTH) + 0
    if (match($0, /[0-9]+ failed/)) f = substr($0, RSTART, RLENGTH) + 0
    print p, f }'
)
rm -f "$log"
echo "tests: $passed passed, $failed failed"
if [ "$doc_rc" -ne 0 ]; then exit "$doc_rc"; fi
exit "$rc"
