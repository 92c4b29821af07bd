#!/usr/bin/env bash
# GPU checks, for a machine with CUDA (a few minutes on one H100/H200): the GPU-marked tests, the
# generation/scoring benchmark against HF transformers on CUDA, and a bf16 FSDP training run of a
# ~150M-parameter model on the synthetic world (tokens/s and MFU from metrics.jsonl).
# Everything it measured is printed; outputs go to ${OUT:-runs/gpu_check}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
bash setup/install.sh
PY=.venv/bin/python
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (torch ' + torch.__version__ + ')')"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)"

echo "== GPU-marked tests"
$PY -m pytest -q -m gpu tests 2>&1 | tail -n 15

echo "== generation and scoring vs HF transformers (CUDA, ~100M params)"
$PY -m benchmarks.generation_throughput device=cuda dim=1024 n_layers=12 n_heads=16 vocab_size=32000 \
    prompts=64 new_tokens=128 max_batch_tokens=262144 repeats=3 2>&1 | tail -n 20

echo "== bf16 FSDP training throughput (1 GPU, ~150M params, synthetic world)"
$PY -m apps.bolt.prepare config=apps/bolt/configs/prepare_synthetic.yaml out_dir="$OUT/data" >/dev/null
$PY -m apps.bolt.train config=apps/bolt/configs/train_em_synthetic.yaml dump_dir="$OUT/train" \
    data.root_dir="$OUT/data" 'data.sources={bootstrap: 1.0}' layout.name=raw tokenizer.name=bytes \
    model.dim=1024 model.n_layers=12 model.n_heads=16 model.n_kv_heads=4 model.hidden_dim=2816 model.max_seqlen=2048 \
    data.batch_size=32 data.seq_len=1024 steps=60 log_freq=10 checkpoint.every=0 \
    checkpoint.consolidate=false 2>&1 | grep -E "tok/s|MFU|params" | tail -n 8
$PY - "$OUT/train/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last = rows[-1]
keys = [k for k in last if "tok" in k or "mfu" in k.lower() or "mem" in k.lower()]
print({k: last[k] for k in keys})
PY
echo "gpu_check: done"
