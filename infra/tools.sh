#!/usr/bin/env bash
# Installs the build and deploy tools the project uses into a venv of its own (idempotent):
# cargo-lambda (with zig, for arm64 cross-builds), the SAM CLI and cfn-lint, and AWS's KPL
# aggregation package (aws-kinesis-agg, for the interoperability tests), all from PyPI.
# Prints the venv's bin directory; put it on PATH.
set -euo pipefail
PUSHPULL_HOME="${PUSHPULL_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/pushpull}"
VENV="$PUSHPULL_HOME/tools"
PINS=(cargo-lambda==1.9.2 aws-sam-cli==1.170.0 cfn-lint==1.58.0 aws-kinesis-agg==1.2.3)
stamp="$VENV/.installed-$(printf '%s ' "${PINS[@]}" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[tools] installing ${PINS[*]} into $VENV" >&2
  py=""
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info < (3, 14) else 1)'; then py="$c"; break; fi
  done
  [ -n "$py" ] || { echo "[tools] error: need Python 3.9-3.13 for the SAM CLI" >&2; exit 1; }
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "${PINS[@]}"
  touch "$stamp"
fi
echo "$VENV/bin"
