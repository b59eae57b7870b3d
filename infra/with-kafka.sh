#!/usr/bin/env bash
# Runs a command with the Kafka broker up (`infra/kafka.sh`); stops it afterwards if this script
# started it.
exec "$(dirname "${BASH_SOURCE[0]}")/with-service.sh" kafka "$@"
