#!/usr/bin/env bash
# Install the reference llmlingua 0.2.2 with the transformers it needs (4.46.x) into its
# own folder. It runs as a subprocess with PYTHONPATH pointing there, so it never shares
# a process (or a transformers version) with lingua_integrations.
set -euo pipefail
DEST="${1:-.cache/reference-env}"
if [ -f "$DEST/.ready" ]; then exit 0; fi
python3 -m pip install -q --disable-pip-version-check --no-deps --target "$DEST" \
  transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5 llmlingua==0.2.2 nltk==3.9.1
touch "$DEST/.ready"
