"""Compress real retrieved documents with the embedded default model.

Each case is a real Natural Questions question with 20 retrieved Wikipedia passages
(its gold passage among 19 look-alikes). LongLLMLingua ranks the passages by how well
they predict the question, keeps the best ones within the budget and prunes their
tokens; we print tokens before and after, which passages were kept, and whether the
gold answer survived.

usage: python examples/compress_nq.py [--rate 0.33] [--cases N] [--device auto]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

from lingua_integrations import CompressionEngine
from lingua_integrations.evaluation import contains_answer

SAMPLE = Path(__file__).parent / "data" / "nq_cases_sample.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.33, help="share of target-LLM (cl100k) tokens to keep")
    ap.add_argument("--cases", type=int, default=2, help="how many sample cases to run (up to 4)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f][: args.cases]
    t = time.perf_counter()
    engine = CompressionEngine.shared(device=args.device)
    print(f"model: {engine.model_name} on {engine.device} (loaded in {time.perf_counter() - t:.1f}s)\n")

    for n, case in enumerate(cases, 1):
        t = time.perf_counter()
        result = engine.compress(case["documents"], question=case["question"], rate=args.rate)
        seconds = time.perf_counter() - t
        gold = case["gold_index"]
        print(f"=== case {n}: {case['question']}?  (gold answer: {case['answers'][0]})")
        print(f"tokens (cl100k): {result.origin_tokens} -> {result.compressed_tokens}  "
              f"(rate {result.rate:.2f}, {result.ratio:.1f}x smaller, asked {args.rate}) in {seconds:.1f}s")
        print(f"kept {len(result.kept_indices)}/{len(case['documents'])} passages, in prompt order: "
              + ", ".join(f"#{i}{'*' if i == gold else ''}" for i in result.kept_indices)
              + f"   (* = gold passage, rank {result.contexts[gold].rank + 1})")
        print(f"gold answer still in the prompt: {contains_answer(result.compressed_prompt, case['answers'])}")
        best = result.contexts[result.kept_indices[0]] if result.kept_indices else None
        if best:
            print(f"first kept passage ({best.origin_tokens} -> {best.compressed_tokens} tokens): "
                  f"{best.text[:300]}{'...' if len(best.text) > 300 else ''}")
        print()


if __name__ == "__main__":
    main()
