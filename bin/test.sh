#!/usr/bin/env bash
# The test command of the README: set up the environment (idempotent), then run the suite on CPU.
# Tests keep to one thread each (tests/conftest.py), so the suite runs in BOLT_TEST_WORKERS
# processes (default 2, pytest-xdist; whole files per process, so module fixtures are built once);
# BOLT_TEST_WORKERS=1 runs it in this one process (for -s, --pdb or a single test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup/install.sh
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers=${BOLT_TEST_WORKERS:-2}
parallel=()
if [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
set +e
.venv/bin/python -m pytest -q "${parallel[@]}" "$@"
rc=$?
set -e
# pytest exit code 5 means "no tests collected": not a failure of the project.
if [ "$rc" -eq 5 ]; then rc=0; fi
exit "$rc"
