#!/usr/bin/env bash
# The README's demo: on a fresh CPU machine, set up the environment, then show what bootstrapping's
# E-step does in the embedded synthetic math world: prepare -> base model (pretrained once, cached
# in .cache/bolt_bases) -> warmstart on the oracle teacher's thoughts, a raw baseline beside it ->
# one E-step (K=4) of the warmstart model with every thought graded against the oracle ->
# results table and plot. No network, no GPU, no API keys. Extra args override the config, e.g.
#   bash bin/demo.sh dump_dir=runs/my_demo
# Accuracy across EM iterations (the paper's claims) is the science run, too long for a demo:
#   python -m apps.bolt.em config=apps/bolt/configs/em_science.yaml   (docs/science.md)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash setup/install.sh
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m apps.bolt.em config=apps/bolt/configs/em_synthetic.yaml "$@" 2>&1 \
  | tee /tmp/bolt_demo.log \
  | grep --line-buffered -E "^\||EM results|E-steps|\[em\] [^ ]+: (done|complete)|Traceback|Error" \
  | sed -u -E 's/^[0-9-]+ [0-9:,]+ [A-Z]+ apps\.bolt\.em: //'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "demo failed (exit $status); full log: /tmp/bolt_demo.log" >&2
  exit "$status"
fi
dump=$(grep -E "^dump_dir:" /tmp/bolt_demo.log | head -1 | awk '{print $2}')
echo
echo "results: ${dump}/results.md  plots: ${dump}/accuracy.png ${dump}/bootstrap.png  full log: /tmp/bolt_demo.log"
echo "demo finished in $(( $(date +%s) - start )) s"
