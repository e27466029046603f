"""The engine's default mode on real NQ documents and the real embedded model."""

from __future__ import annotations

import threading

import pytest

from conftest import is_char_subsequence

from lingua_integrations import CompressionEngine


def _check_accounting(result, n):
    assert [c.index for c in result.contexts] == list(range(n))  # every input context, in input order
    assert sorted(result.kept_indices + result.dropped_indices) == list(range(n))
    for c in result.contexts:
        assert c.kept == (c.index in result.kept_indices)
        assert (c.text != "") == c.kept


def test_longllmlingua_meets_rate_ranks_and_keeps_subsequences(engine, nq_cases):
    case = nq_cases[0]
    result = engine.compress(case.documents, question=case.question, rate=0.33)
    _check_accounting(result, len(case.documents))
    assert result.method == "longllmlingua"
    assert 0.33 * 0.85 <= result.rate <= 0.33 * 1.15
    # prompt order is rank order (most relevant first), and ranks cover every non-empty doc
    ranks = [result.contexts[i].rank for i in result.order]
    assert ranks == sorted(ranks)
    assert sorted(c.rank for c in result.contexts) == list(range(len(case.documents)))
    # token deletion only: each compressed document is a character subsequence of its original
    for i in result.order:
        assert is_char_subsequence(result.contexts[i].text, case.documents[i])
    # the question survives whole, at the end
    assert result.compressed_prompt.endswith(case.question)


def test_llmlingua_keeps_original_order_without_a_question(engine, nq_cases):
    case = nq_cases[1]
    result = engine.compress(case.documents, method="llmlingua", rate=0.4)
    _check_accounting(result, len(case.documents))
    assert result.order == sorted(result.order)
    assert 0.4 * 0.85 <= result.rate <= 0.4 * 1.15


def test_longllmlingua_without_question_falls_back_to_llmlingua(engine, nq_cases):
    result = engine.compress(nq_cases[2].documents[:5], rate=0.5)
    assert result.method == "llmlingua"


def test_target_token_budget(engine, nq_cases):
    case = nq_cases[2]
    result = engine.compress(case.documents, question=case.question, target_token=400)
    assert 400 * 0.85 <= result.compressed_tokens <= 400 * 1.15


@pytest.mark.parametrize("n_docs,rate", [(1, 0.5), (3, 0.33), (8, 0.2)])
def test_rate_adherence_on_short_and_medium_prompts(engine, nq_cases, n_docs, rate):
    case = nq_cases[3]
    result = engine.compress(case.documents[:n_docs], question=case.question, rate=rate)
    assert rate * 0.85 <= result.rate <= rate * 1.15, (result.origin_tokens, result.compressed_tokens)


def test_question_aware_ranking_prefers_the_gold_passage(engine, nq_cases):
    """Over six real cases the question-conditioned rank of the gold passage beats chance.

    By chance the gold passage's mean rank is 9.5 of 0..19 and it lands in the top 3 with
    probability 3/20 (0.9 of 6 cases expected). A 135M scorer is no oracle (BM25 does better
    on NQ, see the quality harness), so we claim only what it reliably does."""
    from lingua_integrations.ranking import rank_contexts

    ranks = []
    for case in nq_cases:
        order = [r.index for r in rank_contexts(engine.scorer, case.documents, case.question, "after")]
        ranks.append(order.index(case.gold_index))
    assert sum(ranks) / len(ranks) < 9.5, ranks
    assert sum(r < 3 for r in ranks) >= 2, ranks

    # the drop-in passes the contexts' ids it tokenized anyway: the same ranking, one tokenization less
    case = nq_cases[0]
    ids = engine.scorer.encode_many(case.documents, special=True)
    for condition in ("after", "none"):
        given = rank_contexts(engine.scorer, case.documents, case.question, condition, context_ids=ids)
        assert given == rank_contexts(engine.scorer, case.documents, case.question, condition)
    with pytest.raises(ValueError, match="context_ids has 1 entries"):
        rank_contexts(engine.scorer, case.documents, case.question, "after", context_ids=ids[:1])


def test_ranking_is_memoised_until_cleared(nq_cases):
    """Compressing the same retrieved set again (another rate) reuses its ranking: no LM
    pass; ``clear_rankings`` forgets it (benchmarks time new retrievals that way)."""
    engine = CompressionEngine(device="cpu")
    runner = engine.loaded.scoring_queue().runner
    case = nq_cases[1]
    runs = []
    for clear in (False, False, True):
        if clear:
            engine.clear_rankings()
        before = runner.forward_passes
        ranked = engine.rank(case.documents[:8], case.question, ranking="perplexity")
        runs.append((runner.forward_passes - before, ranked))
    assert runs[0][0] > 0 and runs[1][0] == 0 and runs[2][0] == runs[0][0]
    assert runs[0][1] == runs[1][1] == runs[2][1]


def test_concurrent_callers_get_the_sequential_results(engine, nq_cases):
    docs = [c.documents[:6] for c in nq_cases[:4]]
    questions = [c.question for c in nq_cases[:4]]
    expected = [engine.compress(d, question=q, rate=0.3).compressed_prompt for d, q in zip(docs, questions)]
    got: dict[int, str] = {}
    errors = []

    def work(i):
        try:
            got[i] = engine.compress(docs[i % 4], question=questions[i % 4], rate=0.3).compressed_prompt
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors
    assert [got[i] for i in range(8)] == expected * 2


def test_structured_tags_only_when_enabled(engine):
    template = ("<llmlingua, compress=False>Answer with the exact figure from the report.</llmlingua>"
                "<llmlingua, rate=0.3> The quarterly report was long and described the weather, the parking lot, "
                "the new coffee machine and many other things before saying that revenue grew by 12 percent.</llmlingua>")
    result = engine.compress([template], rate=0.5, method="llmlingua", structured=True)
    assert "Answer with the exact figure from the report." in result.compressed_prompt
    assert "<llmlingua" not in result.compressed_prompt
    # off by default: a document cannot mark itself "keep everything"
    plain = engine.compress([template], rate=0.3, method="llmlingua")
    assert "Answer with the exact figure from the report." not in plain.compressed_prompt
    with pytest.raises(ValueError, match="not closed"):
        engine.compress(["<llmlingua, rate=0.5>open"], structured=True)


def test_recover_restores_a_mangled_name(engine):
    original = "The Intertropical Convergence Zone moves north in April, bringing rain to West Africa."
    compressed = "Intertropicalgence Zone north April rain"
    response = "The rain comes with the Intertropicalgence Zone"
    recovered = engine.recover(original, compressed, response)
    assert "Intertropical Convergence Zone" in recovered


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(rate=0), ValueError), (dict(rate=1.5), ValueError), (dict(rate=float("nan")), TypeError),
        (dict(target_token=-5), ValueError), (dict(method="selective"), ValueError),
        (dict(force_context_ids=[99]), ValueError), (dict(iterative_size=1), ValueError),
    ],
)
def test_bad_options_are_explained(engine, kwargs, error):
    with pytest.raises(error):
        engine.compress(["some text here", "more text there"], question="q?", **kwargs)


@pytest.mark.parametrize("context,error", [([None], TypeError), (["ok", 3], TypeError), (b"bytes", TypeError)])
def test_bad_contexts_are_explained(engine, context, error):
    with pytest.raises(error, match="string|text"):
        engine.compress(context, question="q?")


def test_empty_and_whitespace_inputs(engine):
    empty = engine.compress([], question="What is it?")
    assert empty.compressed_prompt == "What is it?" and empty.contexts == []
    blank = engine.compress(["", "   ", "Real text about the Eiffel Tower in Paris, built in 1889."], question="When?",
                            rate=0.9)
    _check_accounting(blank, 3)
    assert blank.kept_indices == [2]
