"""Question-aware evidence selection: the sentences that answer, when the budget is tight.

At 10-20x compression a budget holds one or two retrieved documents at most, and
deleting tokens from them until they fit removes the answer as often as not. Between
LongLLMLingua's document-level (coarse) and token-level (fine) steps the default mode
therefore adds a sentence-level step: from the best-ranked documents it keeps the
sentences that share the most terms with the question (BM25 over the sentences), with
a prior for the document's rank, until the budget is used. The fine step then prunes
what is left at a gentle rate. The reference has no such step; the drop-in
``PromptCompressor`` does not use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .lexical import bm25_scores

_BOUNDARY = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n+")


@dataclass(frozen=True)
class Sentence:
    doc: int  # index of the document
    start: int  # character span in that document
    end: int


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences (or lines) of ``text``, whitespace excluded."""
    spans, pos = [], 0
    for m in _BOUNDARY.finditer(text):
        if text[pos : m.start()].strip():
            spans.append((pos, m.start()))
        pos = m.end()
    if text[pos:].strip():
        spans.append((pos, len(text.rstrip())))
    return spans


def select_evidence(
    question: str,
    texts: Sequence[str],
    ranked: Sequence[int],
    budget: float,
    count: Callable[[str], int],
    rank_prior: float = 1.0,
) -> dict[int, str]:
    """Keep the sentences of ``texts`` most relevant to ``question`` within ``budget``
    target-LLM tokens.

    ``ranked`` lists the candidate documents, best first; a sentence's score is its
    BM25 score for the question (scaled to [0, 1] over the candidates) plus
    ``rank_prior / (1 + rank)`` of its document. Returns, for each document that keeps
    something, its kept sentences in their original order; at least one sentence is
    kept (the best), even when it alone exceeds the budget.
    """
    sentences = [Sentence(d, s, e) for d in ranked for s, e in split_sentences(texts[d])]
    if not sentences:
        return {}
    lexical = bm25_scores(question, [texts[s.doc][s.start : s.end] for s in sentences])
    top = max(lexical) or 1.0
    position = {d: pos for pos, d in enumerate(ranked)}
    scores = [lex / top + rank_prior / (1 + position[s.doc]) for s, lex in zip(sentences, lexical)]
    chosen: list[Sentence] = []
    used = 0.0
    for k in sorted(range(len(sentences)), key=lambda k: -scores[k]):
        s = sentences[k]
        cost = count(texts[s.doc][s.start : s.end]) + 1
        if chosen and used + cost > budget:
            continue
        chosen.append(s)
        used += cost
    out: dict[int, str] = {}
    for d in ranked:
        parts = sorted((s.start, s.end) for s in chosen if s.doc == d)
        if parts:
            out[d] = " ".join(texts[d][s:e] for s, e in parts)
    return out
