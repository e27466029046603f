"""Run the reference llmlingua 0.2.2 on requests read from a JSON file; print JSON results.

Runs in the reference environment only (transformers 4.46.x on PYTHONPATH), as a
subprocess of our tests and benchmarks; lingua_integrations never imports llmlingua.

usage: PYTHONPATH=.cache/reference-env python reference_runner.py MODEL_DIR DEVICE REQUESTS.json [llmlingua2]
Each request: {"context": [...], "question": "...", "kwargs": {...}}; the output is one
JSON list of the reference's result dicts plus "seconds" (wall time of that call).
"""
import json
import sys
import time

import transformers
from llmlingua import PromptCompressor

model_dir, device, path = sys.argv[1:4]
use_llmlingua2 = sys.argv[4:5] == ["llmlingua2"]
requests = json.load(open(path))
pc = PromptCompressor(model_name=model_dir, device_map=device, model_config={"trust_remote_code": False},
                      use_llmlingua2=use_llmlingua2)
out = []
for req in requests:
    t = time.perf_counter()
    if use_llmlingua2:
        res = pc.compress_prompt(req["context"], **req.get("kwargs", {}))
    else:
        res = pc.compress_prompt(req["context"], question=req.get("question", ""),
                                 instruction=req.get("instruction", ""), **req.get("kwargs", {}))
    res["seconds"] = time.perf_counter() - t
    res["transformers"] = transformers.__version__
    out.append(res)
json.dump(out, sys.stdout)
