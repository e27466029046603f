#!/usr/bin/env bash
# Set up, then run the main job: a LangChain RAG chain over real NQ passages in which
# our compressor (LongLLMLingua on the embedded SmolLM2-135M) prunes what BM25
# retrieved before a local LLM answers. Prints tokens before/after, what was kept, the answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
cd examples
python langchain_rag.py "$@"
