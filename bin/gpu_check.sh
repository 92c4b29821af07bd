#!/usr/bin/env bash
# GPU checks, for a machine with CUDA (about 5 minutes on one H100/H200):
#   1. the GPU-marked tests;
#   2. generation and scoring vs HF transformers on CUDA (~100M params, fp32 and bf16);
#   3. bf16 training throughput of a ~150M-parameter model (eager and torch.compile), with MFU;
#   4. an E-step on CUDA (fp32 and bf16) when a checkpoint and raw data are given;
#   5. the 1.1B (TinyLlama) shape, random weights (~3 minutes): E-step chunks/s and generated
#      tokens/s of backend=engine vs backend=vllm on the same chunks (and at the demo size), and
#      the bf16 training step with FSDP2 + torch.compile (tokens/s, MFU). vLLM comes from the
#      'vllm' extra (pip install -e .[vllm]); without it the vllm rows print the install error.
# Everything measured is printed. Work goes to $WORK (default runs/gpu_check).
# GPU_CHECK_SECTIONS=scale runs only section 5 (=base: only 1-4; default: all).
#
#   bash bin/gpu_check.sh                        # uses .venv (runs setup/install.sh)
#   BOLT_PYTHON=python3 bash bin/gpu_check.sh    # an existing environment, no install (offline boxes)
#   ESTEP_CKPT=RUN/checkpoints/N/consolidated ESTEP_SRC=DATA/bootstrap bash bin/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/gpu_check}
mkdir -p "$WORK"
if [ -n "${BOLT_PYTHON:-}" ]; then
  PY=$BOLT_PYTHON
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
else
  bash setup/install.sh
  PY=.venv/bin/python
fi
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (torch ' + torch.__version__ + ')')"
$PY -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)"
section() { echo; echo "== $1 ($(date +%T))"; }
SECTIONS=${GPU_CHECK_SECTIONS:-all}

if [ "$SECTIONS" != scale ]; then
section "GPU-marked tests"
{ $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests 2>&1 || echo "pytest exit $? (collection errors of modules needing packages this environment lacks are expected)"; } | tail -n 4

for dtype in float32 bfloat16; do
  section "generation and scoring vs HF transformers, $dtype (CUDA, ~100M params)"
  $PY -m benchmarks.generation_throughput device=cuda dtype=$dtype dim=1024 n_layers=8 n_heads=16 vocab_size=32000 \
      prompts=64 new_tokens=128 max_batch_tokens=262144 repeats=2 2>&1 | tail -n 12
done

section "bf16 training throughput (1 GPU, ~150M params, synthetic world)"
$PY -m apps.bolt.prepare config=apps/bolt/configs/prepare_synthetic.yaml out_dir="$WORK/data" >/dev/null 2>&1
for compile in false true; do
  echo "-- compile=$compile"
  $PY -m apps.bolt.train config=apps/bolt/configs/train_em_synthetic.yaml dump_dir="$WORK/train_compile_$compile" \
      data.root_dir="$WORK/data" 'data.sources={bootstrap: 1.0}' layout.name=raw tokenizer.name=bytes \
      model.dim=1024 model.n_layers=12 model.n_heads=16 model.n_kv_heads=4 model.hidden_dim=2816 model.max_seqlen=2048 \
      data.batch_size=32 data.seq_len=1024 optim.warmup=10 steps=60 log_freq=10 checkpoint.every=0 \
      distributed.compile=$compile 2>&1 | grep -E "params|step 60/" | tail -n 3
  $PY - "$WORK/train_compile_$compile/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last = rows[-1]
print({k: last[k] for k in last if "speed" in k or "mem" in k or k in ("step", "loss/train")})
PY
done

if [ -n "${ESTEP_CKPT:-}" ] && [ -n "${ESTEP_SRC:-}" ]; then
  for dtype in float32 bfloat16; do
    section "E-step on CUDA, $dtype (${ESTEP_DOCS:-250} docs, K=4, estep_synthetic.yaml)"
    $PY -m apps.bolt.estep config=apps/bolt/configs/estep_synthetic.yaml ckpt="$ESTEP_CKPT" src="$ESTEP_SRC" \
        out="$WORK/estep_$dtype" device=cuda dtype=$dtype limit_docs=${ESTEP_DOCS:-250} progress=false \
        batch_chunks=${ESTEP_BATCH_CHUNKS:-512} max_batch_tokens=${ESTEP_BATCH_TOKENS:-262144} 2>&1 \
      | grep -E "E-step|Error" | tail -n 4
    $PY - "$WORK/estep_$dtype/lineage.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["stats"]
secs = s["sample_seconds"] + s["score_seconds"]
print(f"chunks/s {s['chunks'] / secs:.1f} | samples/s {s['samples_drawn'] / secs:.1f} | ESS mean {d['ess']['mean']:.2f} | ELBO-1/2/4 per token " + " / ".join(f"{v['mean']:.3f}" for v in d['elbo_per_token'].values()))
PY
  done
fi
fi

if [ "$SECTIONS" != base ]; then
section "vLLM backend tests (tests/test_vllm_backend.py; GPU ones skip without vllm)"
{ timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py 2>&1 || echo "pytest exit $?"; } | tail -n 6

section "E-step backends, demo size (random weights, 256 chunks, K=4, up to 64 latent tokens)"
timeout 240 $PY -m benchmarks.estep_throughput preset=demo 'backends=[engine,vllm]' device=cuda dtype=bfloat16 \
    chunks=256 max_latent_tokens=64 batch_chunks=256 2>&1 | grep -E "^\||^E-step|^ratio|Error" || echo "(exit $?)"

section "E-step backends, TinyLlama-1.1B shape (random weights, ${SCALE_CHUNKS:-64} chunks, K=4, up to 128 latent tokens)"
timeout 420 $PY -m benchmarks.estep_throughput preset=tinyllama 'backends=[engine,vllm]' device=cuda dtype=bfloat16 \
    chunks=${SCALE_CHUNKS:-64} max_latent_tokens=128 batch_chunks=256 2>&1 | grep -E "^\||^E-step|^ratio|Error" || echo "(exit $?)"

section "bf16 training, TinyLlama-1.1B shape (seq 2048, batch ${SCALE_BATCH:-8}, FSDP2 on 1 GPU, torch.compile)"
timeout 300 $PY -m benchmarks.train_throughput --preset tinyllama --batch ${SCALE_BATCH:-8} --steps 6 2>&1 \
  | grep -E "warm-up|model:|ours_fsdp|Error" || echo "(exit $?)"
fi
section "gpu_check: done"
