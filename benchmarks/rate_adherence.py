"""Rate adherence: asked rate vs achieved rate, ours (default mode) and the reference.

Prompts of 100 to 20,000 cl100k tokens are made of real NQ passages (with a real NQ
question). Ours runs ``CompressionEngine.compress`` (LongLLMLingua, default mode); the
reference ``llmlingua`` 0.2.2 runs in its own environment as a subprocess, on the same
prompts and the same converted SmolLM2 weights, with the LongLLMLingua parameters of
its README. Prints a markdown table and writes JSON to ``benchmarks/results/``.

usage: python benchmarks/rate_adherence.py [--rate 0.33] [--sizes 100,500,...] [--device cpu]
       (needs tools/reference/setup.sh to have been run for the reference column)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_integrations import CompressionEngine, TokenCounter  # noqa: E402
from lingua_integrations.evaluation import load_rows  # noqa: E402
from lingua_integrations.evaluation.reference import run_reference  # noqa: E402
from lingua_integrations.models import materialize_embedded  # noqa: E402

REFERENCE_KWARGS = dict(condition_in_question="after_condition", reorder_context="sort",
                        dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100",
                        rank_method="longllmlingua")


def make_prompt(rows: list[dict], size: int, count: TokenCounter) -> list[str]:
    """Passages until ``size`` cl100k tokens; the last one cut at a word to land on it."""
    docs, total = [], 0
    for row in rows[1:]:
        text = row["text"]
        n = count(text)
        if total + n > size:
            words = text.split()
            while words and count(" ".join(words)) > size - total:
                words = words[: max(1, int(len(words) * 0.9))] if len(words) > 1 else []
            if words:
                docs.append(" ".join(words))
            break
        docs.append(text)
        total += n
    return docs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--sizes", default="100,150,300,1000,3000,6000,12000,20000")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/nq-open-oracle-dev.jsonl.gz"))
    ap.add_argument("--reference-env", default=str(ROOT / ".cache/reference-env"))
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()

    rows = load_rows(args.data)
    count = TokenCounter("cl100k_base")
    question = rows[0]["question"]
    engine = CompressionEngine.shared(device=args.device)
    sizes = [int(s) for s in args.sizes.split(",")]
    prompts = [make_prompt(rows, s, count) for s in sizes]

    ours = []
    for docs in prompts:
        t = time.perf_counter()
        r = engine.compress(docs, question=question, rate=args.rate)
        ours.append({"origin": r.origin_tokens, "compressed": r.compressed_tokens, "seconds": time.perf_counter() - t})
        print(f"ours {r.origin_tokens} -> {r.compressed_tokens} ({r.rate / args.rate:.2f} of asked)", file=sys.stderr)
    reference = None
    if not args.no_reference:
        reqs = [{"context": d, "question": question, "kwargs": {**REFERENCE_KWARGS, "rate": args.rate}} for d in prompts]
        try:
            reference = run_reference(reqs, materialize_embedded("smollm2-135m"), args.device,
                                      env_dir=Path(args.reference_env))
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"(no reference column: {exc})", file=sys.stderr)

    lines = ["| prompt tokens | docs | ours: achieved/asked | ours s | reference: achieved/asked | reference s |",
             "|---|---|---|---|---|---|"]
    table = []
    for i, docs in enumerate(prompts):
        o = ours[i]
        row = {"origin_tokens": o["origin"], "docs": len(docs), "ours_rate": o["compressed"] / o["origin"],
               "ours_seconds": o["seconds"]}
        ref_cell, ref_s = "n/a", "n/a"
        if reference:
            rr = reference[i]
            row["reference_rate"] = rr["compressed_tokens"] / rr["origin_tokens"]
            row["reference_seconds"] = rr["seconds"]
            ref_cell, ref_s = f"{row['reference_rate'] / args.rate:.2f}", f"{rr['seconds']:.1f}"
        table.append(row)
        lines.append(f"| {o['origin']} | {len(docs)} | {row['ours_rate'] / args.rate:.2f} | {o['seconds']:.1f} | "
                     f"{ref_cell} | {ref_s} |")
    print(f"\nasked rate {args.rate}, LongLLMLingua, SmolLM2-135M fp32 on {args.device}; 1.00 = exactly as asked\n")
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rate_adherence.json").write_text(json.dumps({"rate": args.rate, "device": args.device, "rows": table},
                                                        indent=2))


if __name__ == "__main__":
    main()
