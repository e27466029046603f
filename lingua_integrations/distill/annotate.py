"""Annotation: which words of the original did the teacher keep?

The teacher (an LLM told to delete words only) returns a shorter text. Each word of the
compressed text is matched, in order, to the first word of the original within a sliding
window ahead of the last match: exactly after normalisation (case, surrounding
punctuation), or fuzzily (a close spelling, for long words an LLM re-inflected). Matched
original words are labelled *keep*, the rest *drop*.

Two quality measures decide whether a sample is used (LLMLingua-2, section 3.2):

* **variation rate**: the share of the teacher's words that match no original word in
  order: the teacher paraphrased or added words;
* **alignment gap**: the share of the teacher's words found somewhere in the original
  but not in order (the teacher reordered), as a share of the teacher's words.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

_WORD = re.compile(r"\w+(?:[-'’.]\w+)*|[^\w\s]", re.UNICODE)
_PUNCT = re.compile(r"^[^\w]+$", re.UNICODE)


def split_words(text: str) -> list[tuple[int, int]]:
    """Character spans of the words (and punctuation marks) of ``text``."""
    return [m.span() for m in _WORD.finditer(text)]


def _norm(word: str) -> str:
    return word.lower().strip("'’")


def _similar(a: str, b: str) -> bool:
    if a == b:
        return True
    if min(len(a), len(b)) < 5:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


@dataclass
class Annotation:
    """One original text with a keep/drop label per word."""

    text: str
    spans: list[tuple[int, int]]
    labels: list[bool]
    variation_rate: float
    alignment_gap: float
    compressed: str = ""
    dropped_because: str | None = None

    @property
    def words(self) -> list[str]:
        return [self.text[s:e] for s, e in self.spans]

    @property
    def kept_share(self) -> float:
        return sum(self.labels) / len(self.labels) if self.labels else 0.0


def annotate(original: str, compressed: str, window: int = 150) -> Annotation:
    """Label each word of ``original`` by matching ``compressed`` back onto it in order."""
    spans = split_words(original)
    orig = [_norm(original[s:e]) for s, e in spans]
    comp = [_norm(compressed[s:e]) for s, e in split_words(compressed)]
    comp_words = [w for w in comp if not _PUNCT.match(w)]
    labels = [False] * len(spans)
    pos, unmatched, unmatched_words = 0, 0, []
    for w in comp:
        found = None
        for j in range(pos, min(len(orig), pos + window)):
            if orig[j] == w or (not _PUNCT.match(w) and _similar(orig[j], w)):
                found = j
                break
        if found is None:
            if not _PUNCT.match(w):  # a comma the teacher added is no paraphrase
                unmatched += 1
                unmatched_words.append(w)
            continue
        labels[found] = True
        pos = found + 1
    anywhere = Counter(w for w in orig if not _PUNCT.match(w))
    reordered = sum(1 for w in unmatched_words if anywhere[w] > 0)
    n = max(1, len(comp_words))
    return Annotation(original, spans, labels, (unmatched - reordered) / n, reordered / n, compressed)


@dataclass
class FilterReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in self.dropped.items()) or "none"
        return f"{self.kept} samples kept; dropped: {why}"


def filter_annotations(annotations: Sequence[Annotation], max_variation: float = 0.1, max_gap: float = 0.1,
                       min_kept: float = 0.02, max_kept: float = 0.98) -> tuple[list[Annotation], FilterReport]:
    """Keep samples a token classifier can learn from; say how many were dropped and why.

    * variation rate above ``max_variation``: the teacher paraphrased or added words;
    * alignment gap above ``max_gap``: the teacher reordered words;
    * kept share outside ``[min_kept, max_kept]``: the teacher deleted (almost) nothing or
      (almost) everything, e.g. an empty or refused answer.
    """
    report, kept = FilterReport(), []
    for a in annotations:
        reason = None
        if not a.spans:
            reason = "empty text"
        elif a.variation_rate > max_variation:
            reason = f"variation rate > {max_variation}"
        elif a.alignment_gap > max_gap:
            reason = f"alignment gap > {max_gap}"
        elif not min_kept <= a.kept_share <= max_kept:
            reason = f"kept share outside [{min_kept}, {max_kept}]"
        a.dropped_because = reason
        if reason:
            report.dropped[reason] += 1
        else:
            kept.append(a)
    report.kept = len(kept)
    return kept, report
