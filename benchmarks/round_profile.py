"""Where a device round's time goes when 64 callers share one engine (GPU, SmolLM2 shape).

Diagnostics for issue 5, not a benchmark of record (``benchmarks/speed.py`` is). Runs
``speed.concurrency`` with 16 host workers and times, in the engine's process, each round of
the scoring queue: waiting for requests (``_gather``), the device pass with a synchronise
after it (``_run``), and the time between rounds. Prints one table::

    python3 benchmarks/round_profile.py [--workers 16] [--no-pool]   # carry .cache/gpu

If the queue mostly waits, the callers' own Python (in the workers) bounds throughput; if
the passes take most of it, the device path does (launches, layouts, copies).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speed  # noqa: E402

import lingua_integrations.runner as R  # noqa: E402
from lingua_integrations import serving  # noqa: E402

if "--no-pool" in sys.argv:
    R.SurprisalRunner.__init__.__kwdefaults__["pool_kv"] = False

LOG: list[tuple[str, float, float, int]] = []  # (what, start, seconds, requests)


def _timed(name: str, fn, sync: bool):
    def wrapper(self, *args, **kwargs):
        t = time.perf_counter()
        out = fn(self, *args, **kwargs)
        if sync:
            torch.cuda.synchronize()
        n = len(out) if name == "gather" else len(args[0])
        LOG.append((name, t, time.perf_counter() - t, n))
        return out
    return wrapper


def summary(log: list[tuple[str, float, float, int]], wall: float) -> dict:
    gathers = [x for x in log if x[0] == "gather"]
    runs = [x for x in log if x[0] == "run"]
    return {"wall_s": round(wall, 3), "rounds": len(gathers), "passes": len(runs),
            "gather_s": round(sum(x[2] for x in gathers), 3),
            "run_s": round(sum(x[2] for x in runs), 3),
            "run_ms_median": round(1e3 * statistics.median(x[2] for x in runs), 2) if runs else None,
            "requests_per_round": round(statistics.mean(x[3] for x in gathers), 1) if gathers else None,
            "other_s": round(wall - sum(x[2] for x in log), 3)}


def main() -> None:
    workers = int(sys.argv[sys.argv.index("--workers") + 1]) if "--workers" in sys.argv else 16
    device = "cpu" if "--cpu" in sys.argv else "cuda"  # --cpu: a dry run of this script (threads only)
    assets = Path(".cache/gpu")
    docs, questions = speed.load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    from transformers import AutoTokenizer
    from lingua_integrations.compat import PromptCompressor

    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    speed.build_causal(speed.SHAPES["smollm2-135m-shape"], tok, "smollm2-135m-shape",
                       dtype=torch.float16 if device == "cuda" else torch.float32, device=device)
    engine = PromptCompressor("smollm2-135m-shape", device_map=device).engine
    engine.scorer.use_queue = True
    serving.ScoringQueue._gather = _timed("gather", serving.ScoringQueue._gather, False)
    serving.ScoringQueue._run = _timed("run", serving.ScoringQueue._run, device == "cuda")
    calls = 64 if device == "cuda" else 4
    jobs = [(docs[s: s + 20], questions[s]) for s in [(20 * k) % (len(docs) - 20) for k in range(calls)]]

    def one(job):
        return engine.compress(job[0], question=job[1], rate=0.33)

    for job in jobs:
        one(job)  # shapes of a lone call
    engine.clear_rankings()
    t = time.perf_counter()
    for job in jobs:
        one(job)
    sequential = time.perf_counter() - t
    if workers and device == "cuda":
        engine.start_workers(workers)
    res = {"pooled": engine.scorer.pooled, "workers": workers if device == "cuda" else 0,
           "sequential_s": round(sequential, 3)}
    try:
        with cf.ThreadPoolExecutor(calls) as pool:
            for _ in range(4):  # warm-up rounds: batched shapes captured
                list(pool.map(one, jobs))
            engine.clear_rankings()
            LOG.clear()
            t = time.perf_counter()
            list(pool.map(one, jobs))
            wall = time.perf_counter() - t
    finally:
        engine.stop_workers()
    res.update(throughput_ratio=round(sequential / wall, 2), rounds=summary(list(LOG), wall))
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":  # host workers are spawned processes that import this module
    main()
