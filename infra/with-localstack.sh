#!/usr/bin/env bash
# Runs a command with LocalStack up; stops LocalStack afterwards if this script started it.
exec "$(dirname "${BASH_SOURCE[0]}")/with-service.sh" localstack "$@"
