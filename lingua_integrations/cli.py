"""``lingua-compress``: compress JSONL prompts from a file or stdin.

Each input line is a JSON object: ``context`` (a list of strings, or one string),
optional ``question`` and ``instruction``. Each output line is a JSON object with
``compressed_prompt``, ``origin_tokens``, ``compressed_tokens`` (target-LLM tokens),
``rate``, ``kept_indices`` (input indices of the contexts kept, in prompt order) and
``dropped_indices``. A bad line gets ``{"line": N, "error": "..."}`` on stdout and a
message on stderr; the other lines still go through, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Iterator

from .engine import METHODS, RANKINGS, CompressionEngine
from .models import DEFAULT_MODEL


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lingua-compress",
        description="Compress prompts (JSONL in, JSONL out) with LLMLingua / LongLLMLingua on a small LM.",
    )
    p.add_argument("file", nargs="?", help="JSONL input (default: stdin)")
    p.add_argument("--method", default="longllmlingua", choices=METHODS,
                   help="longllmlingua (question-aware, default), llmlingua, or llmlingua2 (token classification)")
    p.add_argument("--llmlingua2-model", default=None,
                   help="token-classification model for --method llmlingua2 (hub id, local directory or alias; "
                        "default: the offline distilled minilm-l6-smollm2)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local directory or hub id (default {DEFAULT_MODEL})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--rate", type=float, default=None, help="share of target-LLM tokens to keep (default 0.5)")
    budget.add_argument("--target-tokens", type=int, default=None, help="target-LLM tokens to keep")
    p.add_argument("--ranking", default="auto", choices=RANKINGS,
                   help="document ranking with a question: auto/hybrid (small LM + BM25), perplexity, bm25")
    p.add_argument("--granularity", default="word", choices=("word", "token"),
                   help="delete whole words (default) or single small-LM tokens as the papers do")
    p.add_argument("--no-evidence", action="store_true",
                   help="never cut documents to their question-relevant sentences at tight budgets")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    p.add_argument("--batch-size", type=int, default=8, help="contexts scored together when ranking")
    p.add_argument("--encoding", default="cl100k_base", help="tiktoken encoding that counts target-LLM tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(stream, 1):
        if line.strip():
            yield n, line


def _request(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object with a 'context' field")
    if "context" not in obj:
        raise ValueError("missing 'context' (a list of strings)")
    unknown = set(obj) - {"context", "question", "instruction", "id"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}: use context, question, instruction, id")
    return obj


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["distill"]:
        from .distill.cli import main as distill_main

        return distill_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print("lingua-compress: --batch-size must be at least 1", file=sys.stderr)
        return 2
    rate = 0.5 if args.rate is None and args.target_tokens is None else args.rate
    try:
        engine = CompressionEngine.shared(args.model, args.device, args.dtype, args.encoding,
                                          llmlingua2_model=args.llmlingua2_model)
        engine.batch_size = args.batch_size
        stream = open(args.file, encoding="utf-8") if args.file else sys.stdin
    except (ValueError, TypeError, OSError) as exc:
        print(f"lingua-compress: {exc}", file=sys.stderr)
        return 2
    lines = list(_lines(stream)) if args.file else _lines(stream)
    progress = None
    if args.file and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(lines), desc="compressing", unit="prompt", file=sys.stderr)
    failures = 0
    for n, line in lines:
        try:
            req = _request(line)
            res = engine.compress(req["context"], question=req.get("question") or "",
                                  instruction=req.get("instruction") or "", method=args.method, rate=rate,
                                  target_token=args.target_tokens, ranking=args.ranking,
                                  granularity=args.granularity, evidence=False if args.no_evidence else None)
            out = {
                "compressed_prompt": res.compressed_prompt, "origin_tokens": res.origin_tokens,
                "compressed_tokens": res.compressed_tokens, "rate": round(res.rate, 4),
                "kept_indices": res.kept_indices, "dropped_indices": res.dropped_indices,
            }
            if "id" in req:
                out["id"] = req["id"]
        except (ValueError, TypeError) as exc:
            failures += 1
            print(f"lingua-compress: line {n}: {exc}", file=sys.stderr)
            out = {"line": n, "error": str(exc)}
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
