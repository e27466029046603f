"""A/B on a GPU: packed rows' attention through the variable-length flash kernel
(``--varlen``, :mod:`lingua_integrations.packed_attention`) against SDPA's block mask
(``--sdpa``, the default), one setting per process (the attention function is baked into
captured graphs and compiled layers). Prints single-call medians with a hash of each
compressed prompt (same hash: same output), and the 64-caller case (threads, 16 workers)::

    for a in --sdpa --varlen; do python3 benchmarks/varlen_ab.py $a; done   # carry .cache/gpu

The pooled KV cache of ITPC window steps (:mod:`lingua_integrations.kv_pool`, on by default on
CUDA, needs ``--varlen``) is on here unless ``--no-pool``: ``--varlen --no-pool`` against
``--varlen`` is that A/B.
``--pool-eager`` runs the pooled passes outside the compiled layers.
``--prompts=FILE`` writes each single call's compressed prompt there (JSON), for a kept-word
F1 between two settings whose hashes differ.

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
R.SurprisalRunner.__init__.__kwdefaults__["pool_kv"] = False if "--no-pool" in sys.argv else "auto"
from lingua_integrations.compat import PromptCompressor
from transformers import AutoTokenizer


def _rounded(stats: dict) -> dict:
    """A concurrency result's scalars, rounded (nested parts and worker start-up left out)."""
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items() if not isinstance(v, (dict, list))}


def pool_check(runner, ids: torch.Tensor) -> float:
    """Largest difference between a sequence's surprisals scored whole and in two pooled
    steps (the second attending to the first's keys in the pool)."""
    pool = runner.kv_pool()
    region = pool.allocate(len(ids))
    try:
        cut = len(ids) * 2 // 3
        a = runner.pooled_surprisal([(region, 0, ids[:cut], 1)])[0]
        b = runner.pooled_surprisal([(region, cut, ids[cut:], 1)])[0]
    finally:
        pool.release(region)
    whole = runner.surprisal([ids])[0]  # tokens 1 .. n-1; the second step scores from token cut+1
    return float((torch.cat([a, b]) - torch.cat([whole[: cut - 1], whole[cut:]])).abs().max())


def main() -> None:
    shapes = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--shape=")] or ["smollm2-135m-shape", "llama2-7b-shape"]
    assets = Path(".cache/gpu")
    docs, questions = speed.load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    q = questions[0]
    res, prompts = {}, {}
    for shape in shapes:
        speed.build_causal(speed.SHAPES[shape], tok, shape)
        pc = PromptCompressor(shape, device_map="cuda")
        runner = pc.engine.loaded.scoring_queue().runner
        if "--pool-eager" in sys.argv:  # pooled passes outside the compiled layers
            runner._pool_compiled = False
        res[shape + " varlen"] = runner.varlen
        res[shape + " pooled"] = pc.engine.scorer.pooled
        if res[shape + " pooled"]:
            ids = torch.tensor(tok(" ".join(docs[:3])).input_ids[:600])
            res[shape + " pool max diff"] = pool_check(runner, ids)
            print("pool check", res[shape + " pool max diff"], flush=True)
        for nd in ((20, 60) if shape.startswith("smol") else (60,)):
            for name, kw in (("LLMLingua", {"rate": 0.3}), ("LongLLMLingua", {"question": q, "rate": 0.3, **speed.LONG})):
                s, out = speed.timeit(lambda: pc.compress_prompt(docs[:nd], **kw), 5)
                before = runner.positions_run
                pc.compress_prompt(docs[:nd], **kw)
                key = f"{name} {shape} {nd}"
                res[key] = (round(s, 4), hashlib.md5(out["compressed_prompt"].encode()).hexdigest()[:8],
                            runner.positions_run - before)
                prompts[key] = out["compressed_prompt"]
                print(name, shape, nd, res[key], flush=True)
            default = speed.compress_fresh(pc.engine, docs[:nd], question=q, rate=0.33)
            prompts[f"default {shape} {nd}"] = default.compressed_prompt
        if shape.startswith("smol"):
            c = speed.concurrency(pc.engine, docs, questions, 64, workers=(16,))
            res["conc"], res["conc16"] = _rounded(c), _rounded(c["host_workers"])
            print(res["conc"], res["conc16"], flush=True)
        pc = None; speed.release_models()
    print("RESULT", json.dumps(res), flush=True)
    for a in sys.argv:
        if a.startswith("--prompts="):
            Path(a.split("=", 1)[1]).write_text(json.dumps(prompts))


if __name__ == "__main__":  # host workers are spawned processes that import this module
    main()
