#!/usr/bin/env bash
# Run any pipeline stage in one of three modes:
#   bin/stage.sh cat|run|launch <stage> [launcher options ...] -- [stage overrides ...]
# e.g.
#   bin/stage.sh cat    train nproc=8 -- config=apps/bolt/configs/train_tinyllama.yaml
#   bin/stage.sh run    estep shards=2 parallel=2 -- config=apps/bolt/configs/estep_synthetic.yaml
#   bin/stage.sh launch estep shards=200 gpus=1 partition=gpu -- config=...
# cat prints the commands (script=true: also the sbatch script), run executes them here, launch checks the stage's config, then submits to slurm (submitit).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then sed -n '2,8p' "$0"; exit 2; fi
mode=$1; stage=$2; shift 2
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m lingua.launch mode="$mode" module="apps.bolt.$stage" "$@"
