"""Units of deletion: which small-LM tokens must be kept or dropped together.

Token-level deletion with a small LM cuts words apart: the reference turns
"Intertropical Convergence" into "Intertropicalgence" and "completed 1889" into
"completed18", destroying exactly the strings a reader has to copy. The default mode
deletes whole *units* instead:

* ``"word"``: a run of non-space characters (so a number, identifier, URL, e-mail
  address or hyphenated word is one unit), and a date written with a month name
  ("4 July 1776", "July 4, 1776", "July 1776") as one unit; in scripts written without
  spaces (Chinese, Japanese, Korean) each character is a unit;
* ``"token"``: a single small-LM token, except that the byte pieces of one character
  stay together (no half emoji or half CJK glyph).

A space-only token goes with the word after it; a line break is a unit of its own.
"""

from __future__ import annotations

import re
from typing import Literal, Sequence

import numpy as np

from .lexical import STOPWORDS

Granularity = Literal["word", "token"]

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_YEAR = r"\d{3,4}"
_DATE = rf"(?:{_DAY}\s+{_MONTH},?\s+{_YEAR}|{_MONTH}\s+{_DAY},?\s+{_YEAR}|{_MONTH}\s+{_YEAR}|{_MONTH}\s+{_DAY}\b)"
# scripts written without spaces (CJK ideographs, kana, hangul syllables): one character per unit
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_UNIT = re.compile(rf"{_DATE}[^\s{_CJK}]*|[{_CJK}]|[^\s{_CJK}]+")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the deletion units of ``text`` (words and whole dates)."""
    return [m.span() for m in _UNIT.finditer(text)]


# -- character arrays (shared with token_classification) ------------------------
def code_points(text: str) -> np.ndarray:
    """The code point of every character of ``text`` (indexes match ``text``'s)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def prefix_counts(flags: np.ndarray) -> np.ndarray:
    """``c[i]`` = how many flagged positions precede position ``i`` (length n + 1)."""
    return np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])


def next_flagged(flags: np.ndarray) -> np.ndarray:
    """For each position, the first flagged position at or after it (``len(flags)`` if none)."""
    pos = np.where(flags, np.arange(len(flags)), len(flags))
    return np.minimum.accumulate(pos[::-1])[::-1]


def _token_words(text: str, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The word (index into :func:`word_spans`) each token starts in or first covers; -1 for none."""
    owner = np.full(len(text) + 1, -1, dtype=np.int64)
    spans = np.asarray(word_spans(text), dtype=np.int64).reshape(-1, 2)
    if len(spans):
        lengths = spans[:, 1] - spans[:, 0]
        positions = np.repeat(spans[:, 0] - np.cumsum(np.concatenate([[0], lengths[:-1]])), lengths) + np.arange(
            lengths.sum())
        owner[positions] = np.repeat(np.arange(len(spans)), lengths)
    hit = next_flagged(owner >= 0)[np.minimum(s, len(text))]  # first owned character at or after the start
    return np.where(hit < np.minimum(e, len(text)), owner[np.minimum(hit, len(text))], -1)


def token_units(text: str, offsets: Sequence[tuple[int, int]], granularity: Granularity = "word") -> list[int]:
    """Unit number of each token (by its character ``offsets`` in ``text``).

    Numbers increase along the text; tokens of one unit are contiguous.
    """
    if granularity not in ("word", "token"):
        raise ValueError(f"granularity must be 'word' or 'token', got {granularity!r}")
    if not len(offsets):
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = off[:, 0], off[:, 1]
    # a token starting at or after the end of every earlier token begins a new character
    last_end = np.concatenate([[-1], np.maximum.accumulate(e)[:-1]])
    new_char = s >= last_end
    if granularity == "token":
        return (np.cumsum(new_char) - 1).tolist()
    words = _token_words(text, s, e)
    # a space-only token belongs to the word after it, so dropping "1889" in
    # "completed 1889" cannot leave "completed " + nothing, nor keep the space alone;
    # a line break stays a unit of its own
    newline = prefix_counts(code_points(text) == ord("\n"))
    has_newline = newline[np.minimum(e, len(text))] > newline[np.minimum(s, len(text))]
    fillable = (words < 0) & ~has_newline
    source = next_flagged(~fillable)  # the next token that is not fillable
    words = np.where(fillable, np.append(words, -1)[source], words)
    prev = np.concatenate([[-1], words[:-1]])
    new_unit = np.where(words < 0, new_char, (prev < 0) | (words != prev))
    return (np.cumsum(new_unit) - 1).tolist()


def salient_units(text: str, offsets: Sequence[tuple[int, int]], units: Sequence[int]) -> set[int]:
    """Units that look like what a reader must copy: a word with a digit, or with a
    capital letter that is not just a capitalised function word ("The", "In")."""
    spelled: dict[int, list[str]] = {}
    for (s, e), u in zip(offsets, units):
        spelled.setdefault(u, []).append(text[s:e])
    salient = set()
    for u, parts in spelled.items():
        word = "".join(parts).strip()
        # (isalpha / islower first: cheap exits for the common plain lower-case word)
        if not word.isalpha() and any(ch.isdigit() for ch in word):
            salient.add(u)
        elif (not word.islower() and any(ch.isupper() for ch in word)
              and word.strip(".,;:!?()\"'").lower() not in STOPWORDS):
            salient.add(u)
    return salient
