"""Plain baselines the quality harness compares the methods with.

* :func:`bm25_top_documents`: the best documents by BM25 until the budget is used (no
  token pruning): what a plain lexical re-ranker with a token budget would give.
* :func:`random_word_drop`: keep a random share of the words.
* :class:`SelectiveContext`: one-shot self-information pruning (Li et al., 2023): each
  word's information is the sum of its tokens' surprisal under the small LM, computed
  once over the whole text, and the least informative words go. ITPC differs from it by
  conditioning each segment on the *compressed* prefix.

Each returns the kept context text; budgets are in target-LLM tokens.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

from ..lexical import bm25_scores
from ..scoring import CausalScorer
from ..units import token_units, word_spans

SEPARATOR = "\n\n"


def bm25_top_documents(question: str, documents: Sequence[str], budget: float,
                       count: Callable[[str], int]) -> tuple[str, list[int]]:
    """Documents in BM25 order while they fit in ``budget``; returns the text (best
    first) and the kept indices."""
    scores = bm25_scores(question, documents)
    kept, used = [], 0
    for i in sorted(range(len(documents)), key=lambda i: -scores[i]):
        cost = count(documents[i])
        if used + cost > budget:
            continue
        kept.append(i)
        used += cost
    return SEPARATOR.join(documents[i] for i in kept), kept


def random_word_drop(documents: Sequence[str], rate: float, seed: int = 0) -> str:
    """Keep each word with probability ``rate`` (seeded), documents in their order."""
    rng = random.Random(seed)
    out = []
    for doc in documents:
        words = [doc[s:e] for s, e in word_spans(doc)]
        kept = [w for w in words if rng.random() < rate]
        if kept:
            out.append(" ".join(kept))
    return SEPARATOR.join(out)


class SelectiveContext:
    """One-shot self-information pruning with the small LM.

    The information of each word does not depend on the budget, so it is computed once
    per text and reused for every budget asked of that text.
    """

    def __init__(self, scorer: CausalScorer) -> None:
        self.scorer = scorer
        self._scored: dict[str, tuple] = {}

    def _score(self, text: str) -> tuple[list[int], list[int], dict[int, float], dict[int, int]]:
        if text not in self._scored:
            enc = self.scorer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor(enc.input_ids, dtype=torch.long)
            info = torch.zeros(len(ids))
            loss = self.scorer.sequence_surprisal(ids)
            info[1 : 1 + len(loss)] = loss
            offsets = [tuple(o) for o in enc.offset_mapping]
            units = token_units(text, offsets, "word")
            unit_info: dict[int, float] = {}
            unit_size: dict[int, int] = {}
            for p, u in enumerate(units):
                if "\n" in text[offsets[p][0] : offsets[p][1]]:
                    unit_info[u] = float("inf")  # line breaks keep the documents apart
                unit_info[u] = unit_info.get(u, 0.0) + float(info[p])
                unit_size[u] = unit_size.get(u, 0) + 1
            self._scored = {text: (list(enc.input_ids), units, unit_info, unit_size)}  # keep the latest only
        return self._scored[text]

    def __call__(self, documents: Sequence[str], budget: float, count: Callable[[str], int]) -> str:
        """The joined ``documents`` pruned to about ``budget`` target-LLM tokens."""
        text = SEPARATOR.join(documents)
        ids, units, unit_info, unit_size = self._score(text)
        target = min(1.0, budget / max(1, count(text))) * len(ids)
        keep, used = set(), 0
        for u in sorted(unit_info, key=lambda u: -unit_info[u]):
            if used >= target:
                break
            keep.add(u)
            used += unit_size[u]
        return self.scorer.decode([t for t, u in zip(ids, units) if u in keep]).strip()
