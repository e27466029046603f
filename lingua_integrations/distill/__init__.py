"""LLMLingua-2 data distillation: a strong model shows, by deleting words, what matters;
a small bidirectional encoder learns it and then compresses many times faster.

Each step works alone::

    from lingua_integrations import distill
    chunks = [c for doc in documents for c in distill.chunk_text(doc, engine.count)]
    answers = distill.run_teacher(chunks, chat_model, cache="teacher.jsonl")   # any LangChain chat model
    samples, report = distill.filter_annotations(
        [distill.annotate(c, a) for c, a in zip(chunks, answers) if a is not None])
    distill.train_compressor(samples, "bert-base-multilingual-cased", "my-compressor")
    CompressionEngine(llmlingua2_model="my-compressor").compress(docs, method="llmlingua2", rate=0.33)

or in one go: :func:`distill` (and ``lingua-compress distill`` on the command line).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .annotate import Annotation, FilterReport, annotate, filter_annotations, split_words
from .teacher import INSTRUCTION, as_teacher, chunk_text, run_teacher
from .train import TrainConfig, TrainResult, save_delta, train_compressor


@dataclass
class DistillResult:
    chunks: int
    answered: int
    report: FilterReport
    train: TrainResult


def distill(documents: Sequence[str], teacher: Any, base_model: str, out_dir: str | Path, *,
            count: Callable[[str], int] | None = None, max_chunk_tokens: int = 512, concurrency: int = 8,
            max_variation: float = 0.1, max_gap: float = 0.1, config: TrainConfig | None = None,
            progress: bool = False) -> DistillResult:
    """Teacher, annotation, filtering and training in one call; the teacher's answers are
    kept in ``out_dir/teacher.jsonl``, so a rerun asks only for what is missing."""
    from ..tokens import TokenCounter

    if isinstance(documents, str):
        raise TypeError("documents must be a list of texts, not one string")
    counter = count or TokenCounter()
    chunks = [c for d in documents if d and d.strip() for c in chunk_text(d, counter, max_chunk_tokens)]
    if not chunks:
        raise ValueError("no text to distil from: pass non-empty documents")
    out = Path(out_dir)
    answers = run_teacher(chunks, teacher, out / "teacher.jsonl", concurrency=concurrency, progress=progress)
    annotated = [annotate(c, a) for c, a in zip(chunks, answers) if a is not None]
    samples, report = filter_annotations(annotated, max_variation, max_gap)
    if progress:
        print(f"annotation: {report}", file=sys.stderr, flush=True)
    if len(samples) < 2:
        raise ValueError(f"only {len(samples)} usable samples after filtering ({report}): give more text, or check "
                         "that the teacher deletes words without rewording them")
    trained = train_compressor(samples, base_model, out / "model", config, progress=progress)
    return DistillResult(len(chunks), sum(a is not None for a in answers), report, trained)


__all__ = ["Annotation", "DistillResult", "FilterReport", "INSTRUCTION", "TrainConfig", "TrainResult", "annotate",
           "as_teacher", "chunk_text", "distill", "filter_annotations", "run_teacher", "save_delta", "split_words",
           "train_compressor"]
