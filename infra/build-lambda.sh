#!/usr/bin/env bash
# Builds deployable Lambda zips (provided.al2023, arm64) of both functions with cargo lambda:
# target/lambda/<function>/bootstrap.zip. `sam build` does the same through the template.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$("$ROOT/infra/tools.sh")"
export PATH="$BIN:$PATH"
installed="$(rustup target list --installed 2>/dev/null || true)"
grep -q aarch64-unknown-linux-gnu <<<"$installed" || rustup target add aarch64-unknown-linux-gnu
cd "$ROOT"
cargo lambda build --release --arm64 --output-format zip -p s3-to-kinesis -p kinesis-rollup
for f in s3-to-kinesis kinesis-rollup; do
  z="target/lambda/$f/bootstrap.zip"
  [ -s "$z" ] || { echo "[build] missing $z" >&2; exit 1; }
  # Listing first, then grep: `unzip | grep -q` under pipefail fails when grep exits early.
  listing="$(unzip -l "$z")"
  grep -q ' bootstrap$' <<<"$listing" || { echo "[build] $z has no bootstrap" >&2; exit 1; }
  echo "[build] $z ($(du -h "$z" | cut -f1))"
done
