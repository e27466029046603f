"""Caller-marked spans: ``<llmlingua, rate=0.3>...</llmlingua>`` and ``compress=False``.

A caller may mark parts of *its own* text (a template, an instruction, a code block) with
their own rate, or exempt them from compression. Parsing is off by default and must
never be applied to retrieved documents: otherwise a document could mark itself "keep
everything". Text outside any tag gets the call's rate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OPEN = re.compile(r"<llmlingua((?:\s*,\s*[a-z_]+\s*=\s*[^,>\s]+)*)\s*>", re.IGNORECASE)
_CLOSE = "</llmlingua>"
_ATTR = re.compile(r"([a-z_]+)\s*=\s*([^,>\s]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Span:
    text: str
    rate: float | None  # None: the call's rate
    compress: bool = True


def parse_spans(text: str) -> list[Span]:
    """Split ``text`` into spans; raise ``ValueError`` on malformed or nested tags."""
    spans: list[Span] = []
    pos = 0
    while True:
        m = _OPEN.search(text, pos)
        if not m:
            rest = text[pos:]
            if _CLOSE in rest:
                raise ValueError("found '</llmlingua>' without a matching '<llmlingua ...>' tag")
            if rest:
                spans.append(Span(rest, None))
            return spans
        if m.start() > pos:
            outside = text[pos : m.start()]
            if _CLOSE in outside:
                raise ValueError("found '</llmlingua>' without a matching '<llmlingua ...>' tag")
            spans.append(Span(outside, None))
        close = text.find(_CLOSE, m.end())
        if close < 0:
            raise ValueError("an '<llmlingua ...>' tag is not closed with '</llmlingua>'")
        inner = text[m.end() : close]
        if _OPEN.search(inner):
            raise ValueError("<llmlingua> tags cannot be nested")
        rate, compress = None, True
        for key, value in _ATTR.findall(m.group(1)):
            key = key.lower()
            if key == "rate":
                try:
                    rate = float(value)
                except ValueError:
                    raise ValueError(f"rate={value!r} in an <llmlingua> tag is not a number") from None
                if not 0.0 < rate <= 1.0:
                    raise ValueError(f"rate={rate} in an <llmlingua> tag must be in (0, 1]")
            elif key == "compress":
                if value not in ("True", "False", "true", "false"):
                    raise ValueError(f"compress={value!r} in an <llmlingua> tag must be True or False")
                compress = value.lower() == "true"
            else:
                raise ValueError(f"unknown <llmlingua> attribute {key!r}: use rate= and compress=")
        if inner:
            spans.append(Span(inner, rate, compress))
        pos = close + len(_CLOSE)


def strip_tags(text: str) -> str:
    return "".join(s.text for s in parse_spans(text))
