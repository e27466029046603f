"""Where a device round's time goes when 64 callers share one engine (GPU, SmolLM2 shape).

Diagnostics for issue 5, not a benchmark of record (``benchmarks/speed.py`` is). Runs the
64-caller case of ``speed.concurrency`` (default mode, 20 NQ documents a call) with each
number of host workers asked for, in one process, and times, in the engine's process, each
round of the scoring queue: the host's time gathering requests (``_gather``) and laying out
and launching passes (``_launch_round``), and the device's time in the captured passes (CUDA
events around each graph replay). Prints one row per setting::

    python3 benchmarks/round_profile.py [--workers 16,64] [--depth 1,2] [--max-wait 0.004] [--no-pool] [--kernels]

(carry ``.cache/gpu``; ``--cpu`` is a dry run of the script, threads only, 4 calls.)

If the device is busy most of the wall time, its passes bound throughput; if not, the
callers' own Python (in the workers) or the queue's host work does. With W
workers the 64 calls run in about 64 / W waves, each as many rounds as a call has
scoring steps, so the rounds' count tells how much of the time is that latency.

``--kernels`` adds, per setting, the timed run's rounds one by one (when each was gathered,
its requests, its host seconds) and a torch.profiler table of one more 64-call run: which
kernels the device's busy time goes to.
"""
from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speed  # noqa: E402
from profile_gpu import kernel_table  # noqa: E402

import lingua_integrations.runner as R  # noqa: E402
from lingua_integrations import serving  # noqa: E402

if "--no-pool" in sys.argv:
    R.SurprisalRunner.__init__.__kwdefaults__["pool_kv"] = False

LOG: list[tuple[str, float, float, int]] = []  # (what, start, seconds, requests)
REPLAYS: list[tuple] = []  # (start, end) CUDA events around each graph replay


def _timed(name: str, fn):
    def wrapper(self, *args, **kwargs):
        t = time.perf_counter()
        out = fn(self, *args, **kwargs)
        LOG.append((name, t, time.perf_counter() - t, len(out) if name == "gather" else len(args[0])))
        return out
    return wrapper


def _replay_timed(replay):
    def wrapper(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay(self)
        end.record()
        REPLAYS.append((start, end))
    return wrapper


def summary(log: list[tuple[str, float, float, int]], wall: float) -> dict:
    """Host seconds gathering and launching rounds, and the seconds the device spent in
    captured passes (eager passes, if any, are not counted)."""
    gathers = [x for x in log if x[0] == "gather"]
    launches = [x for x in log if x[0] == "launch"]
    torch.cuda.synchronize()
    busy = sum(a.elapsed_time(b) for a, b in REPLAYS) / 1e3
    return {"rounds": len(gathers), "passes": len(REPLAYS),
            "requests_per_round": round(statistics.mean(x[3] for x in gathers), 1) if gathers else None,
            "gather_s": round(sum(x[2] for x in gathers), 3),
            "launch_s": round(sum(x[2] for x in launches), 3),
            "device_busy_s": round(busy, 3), "device_busy_share": round(busy / wall, 2)}


def kernels(log: list[tuple[str, float, float, int]], t0: float, pool_map) -> None:
    """The timed run's rounds (start offset ms, host ms, requests) and a kernel table of
    one more run of the same calls under torch.profiler."""
    rounds = [(round((s - t0) * 1e3, 1), what, round(sec * 1e3, 1), n) for what, s, sec, n in log]
    print("ROUNDS (offset ms, step, host ms, requests):", rounds, flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        pool_map()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    print(f"KERNELS (profiled run {wall:.3f} s)\n{kernel_table(prof, 30)}", flush=True)


def _arg(name: str, default: str) -> list[str]:
    return (sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default).split(",")


def main() -> None:
    device = "cpu" if "--cpu" in sys.argv else "cuda"  # --cpu: a dry run of this script (threads only)
    workers = [int(w) for w in _arg("--workers", "16,64")] if device == "cuda" else [0]
    defaults = inspect.signature(serving.ScoringQueue).parameters
    waits = [float(w) for w in _arg("--max-wait", str(defaults["max_wait"].default))]
    depths = [int(d) for d in _arg("--depth", str(defaults["depth"].default))]
    assets = Path(".cache/gpu")
    docs, questions = speed.load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    from transformers import AutoTokenizer
    from lingua_integrations.compat import PromptCompressor

    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    speed.build_causal(speed.SHAPES["smollm2-135m-shape"], tok, "smollm2-135m-shape",
                       dtype=torch.float16 if device == "cuda" else torch.float32, device=device)
    engine = PromptCompressor("smollm2-135m-shape", device_map=device).engine
    engine.scorer.use_queue = True
    queue = engine.loaded.scoring_queue()
    serving.ScoringQueue._gather = _timed("gather", serving.ScoringQueue._gather)
    serving.ScoringQueue._launch_round = _timed("launch", serving.ScoringQueue._launch_round)
    if device == "cuda":
        torch.cuda.CUDAGraph.replay = _replay_timed(torch.cuda.CUDAGraph.replay)
    calls = 64 if device == "cuda" else 4
    jobs = [(docs[s: s + 20], questions[s]) for s in [(20 * k) % (len(docs) - 20) for k in range(calls)]]

    def one(job):
        t = time.perf_counter()
        engine.compress(job[0], question=job[1], rate=0.33)
        return time.perf_counter() - t

    for job in jobs:
        one(job)  # shapes of a lone call
    engine.clear_rankings()
    t = time.perf_counter()
    for job in jobs:
        one(job)
    sequential = time.perf_counter() - t
    head = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "pooled": engine.scorer.pooled,
            "calls": calls, "sequential_s": round(sequential, 3)}
    print("RESULT", json.dumps(head), flush=True)
    rows = []
    for n in workers:
        if n:
            engine.start_workers(n)
        try:
            for wait, depth in [(w, d) for d in depths for w in waits]:
                queue.max_wait, queue.depth = wait, depth
                with cf.ThreadPoolExecutor(calls) as pool:
                    for _ in range(8):  # warm-up rounds, until one captures no new batched shape
                        captured = queue.runner.captured_shapes
                        list(pool.map(one, jobs))
                        if queue.runner.captured_shapes == captured:
                            break
                    engine.clear_rankings()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    LOG.clear()
                    REPLAYS.clear()
                    captured = queue.runner.captured_shapes
                    t = time.perf_counter()
                    lat = sorted(pool.map(one, jobs))
                    wall = time.perf_counter() - t
                row = {"workers": n, "depth": depth, "max_wait": wait, "wall_s": round(wall, 3),
                       "ratio": round(sequential / wall, 2), "p50_s": round(lat[len(lat) // 2], 3),
                       "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
                       "captured_while_timed": queue.runner.captured_shapes - captured,
                       **(summary(list(LOG), wall) if device == "cuda" else {"rounds": len(LOG) // 2})}
                rows.append(row)
                print("RESULT", json.dumps(row), flush=True)
                if "--kernels" in sys.argv and device == "cuda":
                    engine.clear_rankings()
                    with cf.ThreadPoolExecutor(calls) as pool:
                        kernels(list(LOG), t, pool_map=lambda: list(pool.map(one, jobs)))
        finally:
            engine.stop_workers()
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":  # host workers are spawned processes that import this module
    main()
