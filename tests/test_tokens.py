"""Budgets are counted in target-LLM tokens, offline."""

import pytest

from lingua_integrations import TokenCounter


def test_cl100k_offline_counts_like_openai():
    count = TokenCounter("cl100k_base")
    # "hello world" is two tokens in cl100k_base; tiktoken's own docs use this example
    assert count("hello world") == 2
    assert count("") == 0


def test_callable_counter_and_bad_inputs():
    words = TokenCounter(lambda s: len(s.split()))
    assert words("a b c") == 3
    with pytest.raises(ValueError, match="not available offline|encoding"):
        TokenCounter("no_such_encoding")("x")
    with pytest.raises(TypeError):
        TokenCounter(42)
    with pytest.raises(ValueError, match="non-negative int"):
        TokenCounter(lambda s: -1)("x")
