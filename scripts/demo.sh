#!/usr/bin/env bash
# Set up, then compress real retrieved documents (NQ multi-document cases) with the
# embedded default model and show what was kept.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
python examples/compress_nq.py "$@"
