"""How faithful half precision is: kept words in float16 / bfloat16 vs float32, real weights.

The GPU benchmark (``speed.py``) can only carry random weights of the real shapes to the
device, and random weights predict nearly uniformly, which hides rounding: there the GPU
path agrees with the CPU at F1 0.997. Real weights make peaked predictions whose
surprisals sit close to the keep/drop threshold, so this benchmark runs the **real**
SmolLM2-135M (and the default LLMLingua-2 classifier) on this machine's CPU in each
dtype. A CPU half-precision matmul, like a GPU's, accumulates in float32 and rounds its
output, so the rounding error is of the same size as on the GPU; the CPU is only slower.

    python benchmarks/fidelity.py [--cases 4]

Writes ``benchmarks/results/fidelity.{json,md}``. This is the measurement behind
``resolve_dtype``'s GPU default (float16 for the causal LM, bfloat16 for the classifier).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import LONG, load_passages, words_f1  # noqa: E402

from lingua_integrations import CompressionEngine  # noqa: E402
from lingua_integrations.compat import PromptCompressor  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
FIRST_ROW = 100  # cases start here (rows 0-99 are the speed benchmark's)


def cases(n: int) -> list[tuple[list[str], str]]:
    docs, questions = load_passages(ROOT.parent / "shared" / "data" / "nq-open-oracle-dev.jsonl.gz")
    return [(docs[FIRST_ROW + 20 * k : FIRST_ROW + 20 * k + 20], questions[FIRST_ROW + 20 * k]) for k in range(n)]


def outputs(dtype: str, work: list[tuple[list[str], str]]) -> dict[str, list[str]]:
    """Compressed prompts of every case in three settings, in one dtype."""
    pc = PromptCompressor("smollm2-135m", device_map="cpu", model_config={"dtype": dtype})
    engine = CompressionEngine("smollm2-135m", device="cpu", dtype=dtype)  # its own ranking cache
    out: dict[str, list[str]] = {"drop-in LongLLMLingua": [], "default mode": [], "LLMLingua-2 (classifier)": []}
    for ctx, q in work:
        out["drop-in LongLLMLingua"].append(pc.compress_prompt(ctx, question=q, rate=0.33, **LONG)["compressed_prompt"])
        out["default mode"].append(engine.compress(ctx, question=q, rate=0.33).compressed_prompt)
        out["LLMLingua-2 (classifier)"].append(
            engine.compress(ctx, question=q, rate=0.33, method="llmlingua2", ranking="bm25").compressed_prompt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=4, help="NQ cases of 20 documents")
    args = ap.parse_args()
    work = cases(args.cases)
    seconds, runs = {}, {}
    for dtype in DTYPES:
        t = time.perf_counter()
        runs[dtype] = outputs(dtype, work)
        seconds[dtype] = time.perf_counter() - t
        print(f"{dtype}: {seconds[dtype]:.1f} s", flush=True)
    rows = []
    for setting in runs["float32"]:
        for dtype in DTYPES[1:]:
            f1 = [words_f1(a, b) for a, b in zip(runs["float32"][setting], runs[dtype][setting])]
            rows.append({"setting": setting, "dtype": dtype, "mean_f1": statistics.mean(f1), "min_f1": min(f1),
                         "f1": f1})
    result = {"cases": args.cases, "model": "smollm2-135m (real weights), CPU", "seconds": seconds, "rows": rows}
    out = ROOT / "benchmarks" / "results"
    (out / "fidelity.json").write_text(json.dumps(result, indent=2))
    lines = [f"Kept-word F1 against float32, real weights on the CPU, {args.cases} NQ cases of 20 documents, rate 0.33",
             "", "| setting | dtype | mean F1 | min F1 |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['dtype']} | {r['mean_f1']:.3f} | {r['min_f1']:.3f} |" for r in rows]
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
