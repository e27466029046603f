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


def token_units(text: str, offsets: Sequence[tuple[int, int]], granularity: Granularity = "word") -> list[int]:
    """Unit number of each token (by its character ``offsets`` in ``text``).

    Numbers increase along the text; tokens of one unit are contiguous.
    """
    if granularity not in ("word", "token"):
        raise ValueError(f"granularity must be 'word' or 'token', got {granularity!r}")
    units: list[int] = []
    if granularity == "token":
        current, last_end = -1, -1
        for s, e in offsets:
            if s >= last_end:  # starts after every earlier token: a new character
                current += 1
            units.append(current)
            last_end = max(last_end, e)
        return units
    owner = [-1] * len(text)
    for w, (s, e) in enumerate(word_spans(text)):
        owner[s:e] = [w] * (e - s)
    words = [next((owner[p] for p in range(s, min(e, len(text))) if owner[p] >= 0), None) for s, e in offsets]
    # a space-only token belongs to the word after it, so dropping "1889" in
    # "completed 1889" cannot leave "completed " + nothing, nor keep the space alone
    following = None
    for t in range(len(offsets) - 1, -1, -1):
        s, e = offsets[t]
        if words[t] is None and following is not None and "\n" not in text[s:e]:
            words[t] = following
        following = words[t]
    current, previous_word, last_end = -1, None, -1
    for (s, e), word in zip(offsets, words):
        if word is None:  # a line break (or an empty span): its own unit, unless it shares a character
            if s >= last_end:
                current += 1
            previous_word = None
        elif word != previous_word:
            current += 1
            previous_word = word
        units.append(current)
        last_end = max(last_end, e)
    return units


def salient_units(text: str, offsets: Sequence[tuple[int, int]], units: Sequence[int]) -> set[int]:
    """Units that look like what a reader must copy: a word with a digit, or with a
    capital letter that is not just a capitalised function word ("The", "In")."""
    spelled: dict[int, str] = {}
    for (s, e), u in zip(offsets, units):
        spelled[u] = spelled.get(u, "") + text[s:e]
    salient = set()
    for u, word in spelled.items():
        word = word.strip()
        if any(ch.isdigit() for ch in word):
            salient.add(u)
        elif any(ch.isupper() for ch in word) and word.strip(".,;:!?()\"'").lower() not in STOPWORDS:
            salient.add(u)
    return salient
