"""A/B on a GPU: packed rows' attention through the variable-length flash kernel
(``--varlen``, :mod:`lingua_integrations.packed_attention`) against SDPA's block mask
(``--sdpa``, the default), one setting per process (the attention function is baked into
captured graphs and compiled layers). Prints single-call medians with a hash of each
compressed prompt (same hash: same output), and the 64-caller case (threads, 16 workers)::

    for a in --sdpa --varlen; do python3 benchmarks/varlen_ab.py $a; done   # carry .cache/gpu

``--shape=smollm2-135m-shape`` (or ``llama2-7b-shape``) times one shape only.

Diagnostics for issue 5, not a benchmark of record (``benchmarks/speed.py`` is).
"""
import sys, json, time, hashlib
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import speed
import lingua_integrations.runner as R
R.SurprisalRunner.__init__.__kwdefaults__["varlen"] = "auto" if "--varlen" in sys.argv else False
from lingua_integrations.compat import PromptCompressor
from transformers import AutoTokenizer


def _rounded(stats: dict) -> dict:
    """A concurrency result's scalars, rounded (nested parts and worker start-up left out)."""
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items() if not isinstance(v, (dict, list))}


def main() -> None:
    shapes = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--shape=")] or ["smollm2-135m-shape", "llama2-7b-shape"]
    assets = Path(".cache/gpu")
    docs, questions = speed.load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    q = questions[0]
    res = {}
    for shape in shapes:
        speed.build_causal(speed.SHAPES[shape], tok, shape)
        pc = PromptCompressor(shape, device_map="cuda")
        runner = pc.engine.loaded.scoring_queue().runner
        res[shape + " varlen"] = runner.varlen
        for nd in ((20, 60) if shape.startswith("smol") else (60,)):
            for name, kw in (("LLMLingua", {"rate": 0.3}), ("LongLLMLingua", {"question": q, "rate": 0.3, **speed.LONG})):
                s, out = speed.timeit(lambda: pc.compress_prompt(docs[:nd], **kw), 5)
                res[f"{name} {shape} {nd}"] = (round(s, 4), hashlib.md5(out["compressed_prompt"].encode()).hexdigest()[:8])
                print(name, shape, nd, res[f"{name} {shape} {nd}"], flush=True)
        if shape.startswith("smol"):
            c = speed.concurrency(pc.engine, docs, questions, 64, workers=(16,))
            res["conc"], res["conc16"] = _rounded(c), _rounded(c["host_workers"])
            print(res["conc"], res["conc16"], flush=True)
        pc = None; speed.release_models()
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":  # host workers are spawned processes that import this module
    main()
