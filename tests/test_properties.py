"""Faithfulness as a property (hypothesis): over random text and options, compression
only deletes, keeps every document in the accounting, and meets the budget.

Text is drawn from real NQ words mixed with numbers, punctuation, line breaks, CJK,
Arabic, emoji, combining marks and zero-width characters, so the properties are checked
where tokenizers split characters into byte pieces."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import is_char_subsequence

EXOTIC = ["中文", "東京都", "مرحبا", "שלום", "😀", "👩‍💻", "e\u0301", "a\u200bb", "\t", "1,250.5", "$3", "4 July 1776",
          "https://example.org/a?b=1", "x_y-z", "(c)", "—", "?", "\n", "\n\n"]


@st.composite
def documents(draw, vocabulary: list[str]):
    words = st.sampled_from(vocabulary) | st.sampled_from(EXOTIC) | st.integers(0, 99999).map(str)
    n_docs = draw(st.integers(1, 4))
    return [" ".join(draw(st.lists(words, min_size=0, max_size=60))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def vocabulary(nq_rows):
    return sorted({w for r in nq_rows[:40] for w in r["text"].split()})


# deletion units: whitespace-separated words, except that scripts written without spaces
# (ideographs, kana, hangul) are cut character by character
_SPACELESS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_UNITS = re.compile(f"[{_SPACELESS}]|[^\\s{_SPACELESS}]+")


def _is_word_subsequence(small: str, big: str) -> bool:
    it = iter(_UNITS.findall(big))
    return all(w in it for w in _UNITS.findall(small))


def _check(result, docs, target_tokens, fixed_tokens, unit_tokens: int = 0):
    # every input document is accounted for, in input order, kept or dropped
    assert [c.index for c in result.contexts] == list(range(len(docs)))
    assert sorted(result.kept_indices + result.dropped_indices) == list(range(len(docs)))
    assert len(set(result.order)) == len(result.order)
    for c in result.contexts:
        assert c.kept == bool(c.text) == (c.index in result.order)
        assert c.origin_tokens >= c.compressed_tokens
    # the budget holds (within the engine's tolerance, plus separators on tiny inputs, or
    # one indivisible word when the budget is smaller than any word); the question is kept
    # whole even when it alone exceeds the budget
    assert result.compressed_tokens <= max(target_tokens * 1.15, fixed_tokens) + 4 + unit_tokens, (
        result.compressed_tokens, target_tokens)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data(), rate=st.floats(0.05, 1.0), method=st.sampled_from(["longllmlingua", "llmlingua"]),
       granularity=st.sampled_from(["word", "token"]))
def test_compression_only_deletes_and_meets_the_budget(engine, vocabulary, data, rate, method, granularity):
    docs = data.draw(documents(vocabulary))
    question = data.draw(st.sampled_from(["", "who built it in 1889?", "中文 是 什么"]))
    result = engine.compress(docs, question=question, rate=rate, method=method, granularity=granularity)
    largest_word = max((engine.count(w) for d in docs for w in _UNITS.findall(d)), default=0)
    _check(result, docs, result.target_tokens, engine.count(question), largest_word if granularity == "word" else 0)
    for c in result.contexts:
        if c.kept:
            if granularity == "word":
                assert _is_word_subsequence(c.text, docs[c.index]), (c.text, docs[c.index])
            else:
                assert is_char_subsequence(c.text, docs[c.index]), (c.text, docs[c.index])
    if question:
        assert result.compressed_prompt.endswith(question)


def test_a_pruned_context_never_costs_more_than_the_whole(engine):
    # found by the property test above: deleting pieces of "Cylinder" left "0 Cyl", which
    # cl100k_base splits into 3 tokens where "0 Cylinder" takes 2
    docs = ['"Watchtower"', "0 Cylinder"]
    result = engine.compress(docs, rate=0.75, granularity="token")
    _check(result, docs, result.target_tokens, 0)
    assert all(c.compressed_tokens <= c.origin_tokens for c in result.contexts)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data(), rate=st.floats(0.1, 1.0))
def test_forced_spans_survive_whole(engine, vocabulary, data, rate):
    """Text the caller exempts with ``compress=False`` comes out verbatim, at any rate."""
    docs = data.draw(documents(vocabulary))
    keep = data.draw(st.sampled_from(["Keep this sentence exactly: 42 km, 4 July 1776.", "保持 这个 句子。"]))
    tagged = [f"<llmlingua, compress=False>{keep}</llmlingua>" + d for d in docs[:1]] + docs[1:]
    result = engine.compress(tagged, rate=rate, method="llmlingua", structured=True, use_context_level_filter=False)
    assert keep in result.contexts[0].text
