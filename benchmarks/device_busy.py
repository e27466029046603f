"""Single drop-in calls on a GPU: wall time against the device's time in captured passes.

Diagnostics for issue 5, not a benchmark of record (``benchmarks/speed.py`` is). For each
shape, LLMLingua and LongLLMLingua over the first 60 NQ dev passages (the ANCHORS cases,
rate 0.3), as ``speed.py`` calls them, with the scoring queue's ``depth`` (rounds on the
device at once) 1 and 2 interleaved call by call, so host drift hits both alike. Prints
one table: median wall seconds, median seconds the device spent in graph replays (CUDA
events around each), and replays per call::

    python3 benchmarks/device_busy.py [--shape=smollm2-135m-shape] [--docs=20,60]   # carry .cache/gpu

A wall time far above the busy time is host work with the device idle (tokenizing, the
budget controller, ITPC's bookkeeping between window steps); near it, the device's
arithmetic bounds the call.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speed  # noqa: E402
from round_profile import REPLAYS, _replay_timed  # noqa: E402

from lingua_integrations.compat import PromptCompressor  # noqa: E402


def main() -> None:
    shapes = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--shape=")] or list(speed.SHAPES)
    counts = [int(n) for a in sys.argv if a.startswith("--docs=") for n in a.split("=", 1)[1].split(",")] or [60]
    assets = Path(".cache/gpu")
    docs, questions = speed.load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    torch.cuda.CUDAGraph.replay = _replay_timed(torch.cuda.CUDAGraph.replay)
    rows = []
    for shape in shapes:
        speed.build_causal(speed.SHAPES[shape], tok, shape)
        pc = PromptCompressor(shape, device_map="cuda")
        queue = pc.engine.loaded.scoring_queue()
        for nd in counts:
            for name, kw in (("LLMLingua", {"rate": 0.3}), ("LongLLMLingua", {"question": questions[0], "rate": 0.3,
                                                                             **speed.LONG})):
                pc.compress_prompt(docs[:nd], **kw)  # warm-up: shapes captured
                runs: dict[int, list[tuple[float, float, int]]] = {1: [], 2: []}
                for _ in range(5):
                    for depth in runs:
                        queue.depth = depth
                        torch.cuda.synchronize()
                        REPLAYS.clear()
                        t = time.perf_counter()
                        pc.compress_prompt(docs[:nd], **kw)
                        torch.cuda.synchronize()
                        wall = time.perf_counter() - t
                        runs[depth].append((wall, sum(a.elapsed_time(b) for a, b in REPLAYS) / 1e3, len(REPLAYS)))
                for depth, got in runs.items():
                    row = {"case": f"{name} {shape} {nd}", "depth": depth,
                           "wall_s": round(statistics.median(x[0] for x in got), 4),
                           "busy_s": round(statistics.median(x[1] for x in got), 4),
                           "replays": statistics.median(x[2] for x in got)}
                    rows.append(row)
                    print("RESULT", json.dumps(row), flush=True)
        pc = None
        speed.release_models()
    print("\n| case | depth | wall s | device busy s | replays |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['depth']} | {r['wall_s']} | {r['busy_s']} | {r['replays']} |")


if __name__ == "__main__":
    main()
