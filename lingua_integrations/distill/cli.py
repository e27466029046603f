"""``lingua-compress distill``: distil an LLMLingua-2 compressor from your documents and
your chat model in one command.

    lingua-compress distill --documents docs.jsonl --teacher my_llms:chat \\
        --base-model bert-base-multilingual-cased --out my-compressor

``--teacher`` is ``module:attribute``: a LangChain chat model, a callable ``text -> text``,
or a function with no arguments returning either (imported from the current directory
or the Python path). ``--teacher smollm2`` uses this package's own word-level compressor.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from . import TrainConfig, distill


def load_documents(path: str) -> list[str]:
    """JSONL (``text`` field, or ``context`` list) or plain text (documents separated by blank lines)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--documents {path!r} is not a file")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        raw = f.read()
    if ".jsonl" in p.name:
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                docs.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("context"), list):
                docs += [c for c in row["context"] if isinstance(c, str)]
            else:
                raise ValueError(f"{path} line {n}: expected an object with 'text' (or a 'context' list)")
        return docs
    return [block.strip() for block in raw.split("\n\n") if block.strip()]


def load_teacher(spec: str) -> Any:
    if spec == "smollm2":
        from ..engine import CompressionEngine

        engine = CompressionEngine.shared()
        return lambda text: engine.compress([text], method="llmlingua", rate=0.4).compressed_prompt
    if ":" not in spec:
        raise ValueError("--teacher must be 'module:attribute' (a LangChain chat model or a callable) or 'smollm2'")
    module, attr = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    obj = getattr(importlib.import_module(module), attr)
    if callable(obj) and not hasattr(obj, "invoke"):
        try:
            import inspect

            if not inspect.signature(obj).parameters:
                obj = obj()  # a factory
        except (TypeError, ValueError):
            pass
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lingua-compress distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", required=True, help="JSONL ('text' per line) or a text file (blank-line separated)")
    p.add_argument("--teacher", required=True, help="module:attribute of a chat model or callable, or 'smollm2'")
    p.add_argument("--base-model", required=True, help="encoder to fine-tune (local directory or hub id)")
    p.add_argument("--out", required=True, help="output folder (teacher.jsonl, model/)")
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=8, help="teacher calls in flight")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-layers", type=int, default=None, help="train only the top N layers and the head")
    p.add_argument("--max-variation", type=float, default=0.1)
    p.add_argument("--max-gap", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        docs = load_documents(args.documents)
        teacher = load_teacher(args.teacher)
        cfg = TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                          train_layers=args.train_layers, device=args.device)
        result = distill(docs, teacher, args.base_model, args.out, max_chunk_tokens=args.chunk_tokens,
                         concurrency=args.concurrency, max_variation=args.max_variation, max_gap=args.max_gap,
                         config=cfg, progress=True)
    except (ValueError, TypeError, OSError, ImportError, AttributeError) as exc:
        print(f"lingua-compress distill: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"chunks": result.chunks, "answered": result.answered, "annotation": str(result.report),
                      "model": result.train.out_dir, "best_epoch": result.train.best_epoch,
                      "eval": result.train.history[result.train.best_epoch - 1]}, indent=1))
    print(f"use it: CompressionEngine(llmlingua2_model={result.train.out_dir!r}) with method='llmlingua2'",
          file=sys.stderr)
    return 0
