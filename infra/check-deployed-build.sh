#!/usr/bin/env bash
# Proves the deployed build carries no fault injection. `sam build` runs `cargo lambda build
# --release --arm64 --bin <Binary>` at the workspace root (CodeUri ../) without `-p`: cargo
# selects the workspace's default members (Cargo.toml: every crate but the tests crate, which
# turns the functions' `fault-injection` feature on), and the features of that selection are
# what a deployment gets. This builds each template function's binary with that same selection
# (on this machine, in the dev profile: the features, not the code generation, are checked), then
# starts it with each PUSHPULL_INJECT_* variable its tests use and expects it to refuse to start,
# naming the variable. Then it rebuilds the workspace's binaries (the tests run those, with fault
# injection): only a relink, both builds' artifacts are kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
binaries=($(sed -nE 's/^ +Binary: +([A-Za-z0-9_-]+) *$/\1/p' infra/template.yaml))
[ "${#binaries[@]}" -gt 0 ] || { echo "[deployed] no Binary in infra/template.yaml" >&2; exit 1; }
# The variables each function's tests set (tests/tests/*.rs), with a value they use.
declare -A injections=(
  [s3-to-kinesis]="PUSHPULL_INJECT_CRASH_ONCE=/tmp/pushpull-crashed:3000 PUSHPULL_INJECT_PUT_FAILURES=0.2"
  [kinesis-rollup]="PUSHPULL_INJECT_CRASH=after-output PUSHPULL_INJECT_FAILURES=0.2"
)
args=()
for b in "${binaries[@]}"; do args+=(--bin "$b"); done
echo "[deployed] cargo build ${args[*]} (the selection sam build makes)"
cargo build -q "${args[@]}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for b in "${binaries[@]}"; do cp "target/debug/$b" "$out/$b"; done
cargo build -q --workspace --bins
checked=0
for b in "${binaries[@]}"; do
  vars="${injections[$b]:-}"
  [ -n "$vars" ] || { echo "[deployed] $b: no PUSHPULL_INJECT_* variables listed for it here" >&2; exit 1; }
  for kv in $vars; do
    name="${kv%%=*}"
    set +e
    said="$(env -i PATH="$PATH" HOME="$HOME" "$kv" timeout 20 "$out/$b" 2>&1)"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || ! grep -q "$name" <<<"$said" || ! grep -q "no fault injection" <<<"$said"; then
      echo "[deployed] $b with $kv: expected a refusal naming $name, got exit $rc:" >&2
      echo "$said" >&2
      exit 1
    fi
    checked=$((checked + 1))
  done
  echo "[deployed] $b refuses every PUSHPULL_INJECT_* variable: no fault injection in the deployed build"
done
echo "[deployed] $checked refusals checked"
