#!/usr/bin/env bash
# bin/compare.sh cat|run|launch [launcher options ...] -- [stage config overrides ...]  (see bin/stage.sh)
set -euo pipefail
mode=${1:?usage: bin/compare.sh cat|run|launch [launcher options] -- [overrides]}; shift
exec "$(dirname "$0")/stage.sh" "$mode" compare "$@"
