#!/usr/bin/env bash
# Proves the deployed build carries no fault injection. `sam build` runs `cargo lambda build
# --release --arm64 --bin <Binary>` at the workspace root (CodeUri ../) without `-p`: cargo
# selects the workspace's default members (Cargo.toml: every crate but the tests crate, which
# turns the functions' `fault-injection` feature on), and the features of that selection are
# what a deployment gets. This builds each template function's binary with that same selection
# (on this machine, in the dev profile: the features, not the code generation, are checked), then
# starts it with each PUSHPULL_INJECT_* variable its crate reads (functions/<Binary>/src) and
# expects it to refuse to start, naming the variable. Cargo links both builds' binaries to the
# same path: on exit (interrupted too) the workspace's binaries, which the tests run with fault
# injection, are linked back (both builds' artifacts are kept, so that is a relink). Do not run
# it beside a test run. Needs bash 4.4 or later (empty arrays under `set -u`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
target="$(cargo metadata --format-version 1 --no-deps | sed -nE 's/.*"target_directory":"([^"]+)".*/\1/p')"
[ -n "$target" ] || { echo "[deployed] cannot tell cargo's target directory" >&2; exit 1; }
binaries=($(sed -nE 's/^ +Binary: +([A-Za-z0-9_-]+) *$/\1/p' infra/template.yaml))
[ "${#binaries[@]}" -gt 0 ] || { echo "[deployed] no Binary in infra/template.yaml" >&2; exit 1; }
out="$(mktemp -d)"
restore() { rm -rf "$out"; cargo build -q --workspace --bins; }
trap restore EXIT
args=()
for b in "${binaries[@]}"; do args+=(--bin "$b"); done
echo "[deployed] cargo build ${args[*]} (the selection sam build makes)"
cargo build -q "${args[@]}"
for b in "${binaries[@]}"; do cp "$target/debug/$b" "$out/$b"; done
checked=0
for b in "${binaries[@]}"; do
  [ -d "functions/$b/src" ] || { echo "[deployed] no functions/$b/src for the template's Binary $b" >&2; exit 1; }
  vars=($(grep -rhoE 'PUSHPULL_INJECT_[A-Z_]+' "functions/$b/src" | sort -u || true))
  [ "${#vars[@]}" -gt 0 ] || { echo "[deployed] $b reads no PUSHPULL_INJECT_* variable" >&2; exit 1; }
  for name in "${vars[@]}"; do
    set +e
    said="$(env -i PATH="$PATH" HOME="$HOME" "$name=1" timeout 20 "$out/$b" 2>&1)"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || ! grep -q "$name" <<<"$said" || ! grep -q "no fault injection" <<<"$said"; then
      echo "[deployed] $b with $name set: expected a refusal naming it, got exit $rc:" >&2
      echo "$said" >&2
      exit 1
    fi
    checked=$((checked + 1))
  done
  echo "[deployed] $b refuses ${vars[*]}: no fault injection in the build sam deploys"
done
echo "[deployed] $checked refusals checked"
