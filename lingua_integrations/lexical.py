"""Lexical relevance: BM25 between a question and the texts of one call.

A 135M-parameter LM ranks retrieved passages worse than plain term overlap does on
open-domain QA (NaturalQuestions: BM25 puts the gold passage first far more often
than SmolLM2's question perplexity). The default mode therefore fuses both signals
(:func:`lingua_integrations.ranking.fuse`); this module supplies the lexical one.

BM25 statistics (document frequencies, average length) are taken over the texts being
ranked, so no corpus index is needed: a call's documents are their own corpus.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

from rank_bm25 import BM25Okapi

# words of a question that say nothing about which passage answers it
STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how i in is it its of on or "
    "s that the their there these this to was were what when where which who whom whose why "
    "will with you your".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)


def terms(text: str) -> list[str]:
    """Lower-cased, accent-folded word terms without stopwords."""
    folded = text.lower()
    if not folded.isascii():  # ASCII has nothing to fold (most retrieved English text: skip the per-char pass)
        folded = unicodedata.normalize("NFKD", folded)
        folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return [w for w in _WORD.findall(folded) if w not in STOPWORDS]


def bm25_scores(question: str, texts: Sequence[str]) -> list[float]:
    """BM25 (Okapi) score of each text for ``question``; higher is more relevant.

    Texts without any term score 0; a question without terms scores every text 0.
    """
    query = terms(question)
    corpus = [terms(t) for t in texts]
    if not query or not any(corpus):
        return [0.0] * len(texts)
    # rank_bm25 divides by the mean document length: empty texts get a placeholder term
    # that no query contains, so they score 0 without distorting the others much
    bm25 = BM25Okapi([doc or ["\x00"] for doc in corpus])
    return [float(s) for s in bm25.get_scores(query)]
