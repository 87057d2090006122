#!/usr/bin/env bash
# One command for a newcomer: install sdtrain into .venv, then train the quickstart LoRA on the
# bundled pre-trained toy model (about a minute on a laptop CPU). Output: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/sdtrain train lora configs/examples/quickstart.toml "$@"
echo
echo "Done. Look at runs/quickstart/sample/ (before/after samples) and runs/quickstart/quickstart.safetensors."
