#!/usr/bin/env bash
# Checks infra/template.yaml the three ways that catch different mistakes (all offline):
# `sam validate --lint` (cfn-lint on the transformed template), plain `sam validate` (unknown
# event properties), `cfn-lint` (value errors), plus a dependency-cycle check of the transformed
# template, which none of them does and which would only fail at deploy time.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$("$HERE/tools.sh")"
export PATH="$BIN:$PATH" SAM_CLI_TELEMETRY=0
T="$HERE/template.yaml"
echo "[template] sam validate --lint"; sam validate --lint --template "$T"
echo "[template] sam validate --region us-east-1"; sam validate --region us-east-1 --template "$T"
echo "[template] cfn-lint"; cfn-lint "$T"
echo "[template] dependency cycles"; AWS_DEFAULT_REGION=us-east-1 "$BIN/python" "$HERE/template_cycles.py" "$T"
