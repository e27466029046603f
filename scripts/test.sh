#!/usr/bin/env bash
# Set up everything (our env and the reference llmlingua 0.2.2 in its own folder), then
# run the test suite on the real embedded model and the shared NQ data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash tools/reference/setup.sh .cache/reference-env
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
