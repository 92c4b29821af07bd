#!/usr/bin/env bash
# The README's demo: on a fresh CPU machine, set up the environment, then bootstrap latent
# thoughts in the embedded synthetic math world (prepare -> oracle-teacher warmstart -> 2 EM
# iterations with K=4 -> raw-token- and FLOP-matched baselines -> evaluation), print the results
# table and write a plot. No network, no GPU, no API keys. Extra args override the config, e.g.
#   bash bin/demo.sh dump_dir=runs/my_demo trials=3
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash setup/install.sh
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m apps.bolt.em config=apps/bolt/configs/em_synthetic.yaml "$@" 2>&1 \
  | tee /tmp/bolt_demo.log \
  | grep --line-buffered -E "^\||EM results|\[em\] [^ ]+: (done|complete)|Traceback|Error" \
  | sed -u -E 's/^[0-9-]+ [0-9:,]+ [A-Z]+ apps\.bolt\.em: //'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "demo failed (exit $status); full log: /tmp/bolt_demo.log" >&2
  exit "$status"
fi
dump=$(grep -E "^dump_dir:" /tmp/bolt_demo.log | head -1 | awk '{print $2}')
echo
echo "results: ${dump}/results.md  plot: ${dump}/accuracy.png  full log: /tmp/bolt_demo.log"
echo "demo finished in $(( $(date +%s) - start )) s"
