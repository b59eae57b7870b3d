#!/usr/bin/env bash
# README command 2 (and what CI runs): set up what is missing, then run every check and test.
# 1. the template checks and the deployable arm64 zips (SKIP_LAMBDA_BUILD=1 skips the zips);
# 2. LocalStack up (stopped again at the end if this script started it);
# 3. doc tests, then every unit and integration test with cargo-nextest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "[test] installing cargo-nextest from crates.io" >&2
  cargo install --locked cargo-nextest
fi
infra/check-template.sh
if [ -z "${SKIP_LAMBDA_BUILD:-}" ]; then infra/build-lambda.sh; fi
started=""
if ! infra/localstack.sh status >/dev/null 2>&1; then
  infra/localstack.sh up
  started=1
fi
cleanup() { if [ -n "$started" ]; then infra/localstack.sh down; fi; }
trap cleanup EXIT
cargo build --workspace --bins
cargo test --workspace --doc
cargo nextest run --workspace --no-fail-fast
