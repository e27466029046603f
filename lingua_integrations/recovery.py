"""Subsequence recovery (LongLLMLingua): put an answer's words back into their original form.

Token deletion can mangle names ("Intertropical Convergence" -> "Intertropicalgence").
When the target LLM copies such a fragment into its answer, we find the shortest span
of the *original* prompt whose tokens contain the fragment's tokens in order (with
small gaps, where tokens were deleted) and substitute it.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

MAX_GAP = 10  # tokens the compressor may have deleted between two kept ones


def _best_span(phrase_ids: list[int], where: dict[int, list[int]]) -> tuple[tuple[int, int] | None, int]:
    """Shortest original span holding the most of ``phrase_ids`` in order, and its hits."""
    best, best_hits, best_len = None, 1, None
    for first in where.get(phrase_ids[0], []):
        last, hits = first, 1
        for tok in phrase_ids[1:]:
            spots = where.get(tok, [])
            k = bisect.bisect_right(spots, last)
            if k < len(spots) and spots[k] - last <= MAX_GAP:
                last, hits = spots[k], hits + 1
        length = last - first + 1
        if hits > best_hits or (hits == best_hits and best is not None and length < best_len):
            best, best_hits, best_len = (first, last + 1), hits, length
    return best, best_hits


def recover(tokenizer, original_prompt: str, compressed_prompt: str, response: str) -> str:
    """Rewrite the parts of ``response`` that were copied from ``compressed_prompt``
    with the corresponding text of ``original_prompt``."""
    original_ids = tokenizer(original_prompt, add_special_tokens=False).input_ids
    where: dict[int, list[int]] = defaultdict(list)
    for pos, tok in enumerate(original_ids):
        where[tok].append(pos)
    words = response.split(" ")
    out: list[str] = []
    i = 0
    while i < len(words):
        if not words[i] or words[i] not in compressed_prompt:
            out.append(words[i])
            i += 1
            continue
        j = i
        while j + 1 < len(words) and " ".join(words[i : j + 2]) in compressed_prompt:
            j += 1
        phrase = " ".join(words[i : j + 1])
        # a word inside a sentence is tokenized with its leading space: try both forms
        found = [_best_span(ids, where) for ids in (tokenizer(form, add_special_tokens=False).input_ids
                                                    for form in (phrase, " " + phrase)) if ids]
        span, _ = max(found, key=lambda f: f[1], default=(None, 0))
        out.append(tokenizer.decode(original_ids[span[0] : span[1]]).strip() if span else phrase)
        i = j + 1
    return " ".join(out)
