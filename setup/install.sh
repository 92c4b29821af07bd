#!/usr/bin/env bash
# Idempotent environment setup: .venv with torch first, then requirements pinned against it,
# then this project in editable mode. A second run on a ready venv takes seconds.
# Versions: constraints.txt pins everything but torch (pip -c), so installs months apart match.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${BOLT_VENV:-$ROOT/.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}

stamp_of() {  # everything that should trigger a reinstall when it changes
  { cat requirements.txt constraints.txt pyproject.toml; echo "torch=$TORCH_VERSION"; } | sha256sum | cut -c1-16
}
STAMP="$VENV/.bolt-install-$(stamp_of)"
if [ -f "$STAMP" ]; then
  exit 0
fi

"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "python >= 3.11 required"' \
  || { echo "install.sh: need python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# pip of some machines warns once per package about find-links folders that do not exist there;
# drop only those lines (real warnings and errors still show).
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
$PIP install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: NVIDIA GPU found, installing CUDA torch==$TORCH_VERSION"
    quiet_pip install -q "torch==$TORCH_VERSION"
  else
    echo "install.sh: no NVIDIA GPU, installing CPU torch==$TORCH_VERSION"
    # 1) a local wheel (pip's find-links, no network); 2) PyTorch's CPU index; 3) PyPI.
    $PIP install -q --no-index "torch==$TORCH_VERSION" 2>/dev/null \
      || $PIP install -q --timeout 15 --retries 1 "torch==$TORCH_VERSION" \
           --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || quiet_pip install -q "torch==$TORCH_VERSION"
  fi
fi
PIN=$(mktemp); trap 'rm -f "$PIN"' EXIT
"$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$PIN"
echo "install.sh: installing requirements (torch pinned to $(cat "$PIN"))"
quiet_pip install -q -c "$PIN" -c constraints.txt -r requirements.txt
# (setuptools warns about editable installs in general; PYTHONWARNINGS reaches its build process)
PYTHONWARNINGS=ignore quiet_pip install -q -c "$PIN" -c constraints.txt --no-deps -e .
rm -f "$VENV"/.bolt-install-*
touch "$STAMP"
echo "install.sh: environment ready at $VENV"
