"""The reference side of benchmarks/speed.py: runs in the reference's own environment
(llmlingua 0.2.2 with transformers 4.46 on PYTHONPATH), never imported by our package.

usage: python _reference_speed.py SPEC.json OUT.json   (SPEC: written by speed.py)
"""
import json
import statistics
import sys
import time

import torch
from llmlingua import PromptCompressor
from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

spec = json.load(open(sys.argv[1]))
cuda = spec["device"] == "cuda"


def sync():
    if cuda:
        torch.cuda.synchronize()


def timeit(fn, n):
    fn()
    sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


results = []
pcs = {}
for case in spec["cases"]:
    kind = case["kind"]
    if kind == "causal":
        key = ("causal", case["model_dir"])
        if key not in pcs:
            pcs[key] = PromptCompressor(model_name=case["model_dir"], device_map=spec["device"])
        pc = pcs[key]
        if case.get("shape"):  # a random-weight model of this shape replaces the loaded one
            h, i, l, a, kv = case["shape"]
            cfg = LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                              num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=8192)
            if pc.__dict__.get("_shape") != case["shape"]:
                pc.model = None
                torch.cuda.empty_cache()
                torch.manual_seed(0)
                torch.set_default_dtype(torch.float16)
                with torch.device("cuda"):
                    pc.model = LlamaForCausalLM(cfg).eval()
                torch.set_default_dtype(torch.float32)
                pc._shape = case["shape"]
    else:
        key = ("llmlingua2", case["model_dir"], tuple(case.get("shape") or ()))
        if key not in pcs:
            pc = PromptCompressor(model_name=case["model_dir"], device_map=spec["device"], use_llmlingua2=True)
            if case.get("shape"):
                h, l, heads = case["shape"]
                torch.manual_seed(0)
                with torch.device("cuda"):
                    pc.model = BertForTokenClassification(BertConfig(
                        vocab_size=30522, hidden_size=h, num_hidden_layers=l, num_attention_heads=heads,
                        intermediate_size=4 * h, num_labels=2)).eval()
                    pc.model.resize_token_embeddings(len(pc.tokenizer))
            pcs[key] = pc
        pc = pcs[key]
    seconds, out = timeit(lambda: pc.compress_prompt(case["context"], **case["kwargs"]), spec["repeats"])
    results.append({"name": case["name"], "seconds": seconds, "rate": out["rate"],
                    "origin_tokens": out["origin_tokens"], "compressed_prompt": out["compressed_prompt"]})
    print(f"reference {case['name']}: {seconds:.3f}s", flush=True)
json.dump(results, open(sys.argv[2], "w"))
