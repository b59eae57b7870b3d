#!/usr/bin/env bash
# Runs a command with the Redis server up (`infra/redis.sh`); stops it afterwards if this script
# started it.
exec "$(dirname "${BASH_SOURCE[0]}")/with-service.sh" redis "$@"
