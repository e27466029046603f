"""Coarse ranking of contexts: by perplexity (LLMLingua) or by question (LongLLMLingua).

LLMLingua keeps the contexts the small LM finds most *surprising* (highest
perplexity): they carry the most information. LongLLMLingua instead asks how well a
document predicts the question: ``r_k = mean -log p(question + restrictive statement | d_k)``;
the lower, the more relevant. The restrictive statement ("We can get the answer to this
question in the given documents.") sharpens that signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from .scoring import CausalScorer

RESTRICTIVE_STATEMENT = " We can get the answer to this question in the given documents."

Condition = Literal["none", "before", "after"]


@dataclass(frozen=True)
class Ranked:
    index: int  # position in the caller's list
    score: float  # the ranking statistic (perplexity or question perplexity)


def rank_contexts(
    scorer: CausalScorer,
    contexts: Sequence[str],
    question: str = "",
    condition: Condition = "after",
    context_ids: Sequence[Sequence[int]] | None = None,
) -> list[Ranked]:
    """Rank contexts, most valuable first.

    ``condition="none"`` ranks by each context's own perplexity, descending (LLMLingua).
    ``"after"`` scores the question placed after the document, ``"before"`` the document
    placed after the question; both ascending (LongLLMLingua). The ordering is stable, so
    ties keep the caller's order. ``context_ids``: the contexts' token ids with special
    tokens, when the caller has them already (tokenizing 60 passages again costs ~5 ms
    of a GPU call's host time).
    """
    if context_ids is not None and len(context_ids) != len(contexts):
        raise ValueError(f"context_ids has {len(context_ids)} entries for {len(contexts)} contexts")
    if context_ids is None and (condition != "before" or not question):  # "before" needs no context alone
        context_ids = scorer.encode_many(contexts, special=True)
    if condition == "none" or not question:
        items = [(ids, 1) for ids in context_ids]
        scores = scorer.span_perplexities(items)
        order = sorted(range(len(contexts)), key=lambda i: -scores[i])
        return [Ranked(i, scores[i]) for i in order]
    query = question + RESTRICTIVE_STATEMENT
    if condition == "after":
        joined = scorer.encode_many([c + query for c in contexts], special=True)
        items = list(zip(joined, [len(ids) for ids in context_ids]))
    elif condition == "before":
        n = scorer.count(query, special=True)
        items = [(ids, n) for ids in scorer.encode_many([query + c for c in contexts], special=True)]
    else:
        raise ValueError(f"condition_in_question {condition!r} is not one of 'none', 'before', 'after'")
    scores = scorer.span_perplexities(items)
    order = sorted(range(len(contexts)), key=lambda i: scores[i])
    return [Ranked(i, scores[i]) for i in order]


def fuse(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: float = 10.0) -> list[Ranked]:
    """Weighted reciprocal-rank fusion: ``score(d) = sum_j w_j / (k + rank_j(d))``.

    Fuses rankings whose scores are on different scales (BM25 and perplexity) by rank
    alone; ``k`` damps the difference between the first few places. Returns all items
    of the first ranking, best first, with the fused score (higher is better).
    """
    if len(rankings) != len(weights):
        raise ValueError("fuse() needs one weight per ranking")
    fused: dict[int, float] = {i: 0.0 for i in rankings[0]}
    for ranking, w in zip(rankings, weights):
        for pos, i in enumerate(ranking):
            fused[i] = fused.get(i, 0.0) + w / (k + pos)
    first = {i: pos for pos, i in enumerate(rankings[0])}
    order = sorted(fused, key=lambda i: (-fused[i], first.get(i, len(first))))
    return [Ranked(i, fused[i]) for i in order]
