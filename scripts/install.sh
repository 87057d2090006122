#!/usr/bin/env bash
# Create .venv (if missing) and install sdtrain with its dev extras.
# The CPU torch wheel is installed first: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${SDTRAIN_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
bash scripts/fetch_tcmalloc.sh .venv || true
echo "sdtrain installed in $(pwd)/.venv  (activate with: source .venv/bin/activate)"
