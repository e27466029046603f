"""The default mode's quality features (whole words, hybrid ranking, evidence selection)
and the quality harness, on the real embedded model and real NQ / GSM8K data."""

from __future__ import annotations

import re

import pytest

from conftest import SHARED


def test_word_units_keep_numbers_dates_urls_and_spaces_together(engine):
    from lingua_integrations.units import token_units, word_spans

    text = "Completed 1889, on 4 July 1776 see https://en.wikipedia.org/wiki/X_(y) and May 5, 2001.\nNext"
    assert [text[s:e] for s, e in word_spans(text)] == [
        "Completed", "1889,", "on", "4 July 1776", "see", "https://en.wikipedia.org/wiki/X_(y)", "and",
        "May 5, 2001.", "Next"]
    enc = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    units = token_units(text, [tuple(o) for o in enc.offset_mapping], "word")
    pieces: dict[int, str] = {}
    for (s, e), u in zip(enc.offset_mapping, units):
        pieces[u] = pieces.get(u, "") + text[s:e]
    # each unit's tokens spell one word (with the space before it) or a line break
    assert [p.strip() for p in pieces.values() if p.strip()] == [text[s:e] for s, e in word_spans(text)]
    assert "\n" in pieces.values()
    with pytest.raises(ValueError, match="granularity"):
        token_units(text, enc.offset_mapping, "sentence")


def test_bm25_and_fusion():
    from lingua_integrations.lexical import bm25_scores, terms
    from lingua_integrations.ranking import fuse

    assert terms("Who wrote Café Society?") == ["wrote", "cafe", "society"]
    docs = ["The cat sat.", "Café Society was written by Woody Allen.", "", "Society pages."]
    scores = bm25_scores("who wrote cafe society", docs)
    assert scores.index(max(scores)) == 1 and scores[2] == 0.0
    assert bm25_scores("the of a", docs) == [0.0] * 4  # stopwords only: no evidence either way
    fused = [r.index for r in fuse([[0, 1, 2], [2, 1, 0]], [2.0, 1.0])]
    assert fused == [0, 1, 2]  # the heavier ranking wins ties of opposite orders
    assert [r.index for r in fuse([[0, 1, 2], [2, 1, 0]], [1.0, 2.0])] == [2, 1, 0]


def test_sentences_and_evidence_selection(engine):
    from lingua_integrations.evidence import select_evidence, split_sentences

    text = 'He said "Go." Then it rained.\nNew line here! Last one'
    assert [text[s:e] for s, e in split_sentences(text)] == ['He said "Go."', "Then it rained.", "New line here!",
                                                            "Last one"]
    docs = ["Paris is big. The Eiffel Tower was completed in 1889. It is tall.",
            "London has a tower too. Rain is common."]
    chosen = select_evidence("when was the eiffel tower completed", docs, [0, 1], 12, engine.count)
    assert chosen == {0: "The Eiffel Tower was completed in 1889."}
    # a budget smaller than any sentence still keeps the best one
    assert select_evidence("eiffel tower completed", docs, [1, 0], 1, engine.count) == chosen


def _words(text: str) -> set[str]:
    return set(text.split())


def test_default_mode_deletes_whole_words_and_the_paper_mode_cuts_them(engine, nq_cases):
    """Every word of the default mode's output is a word of the input; token deletion
    (the papers' granularity) leaves fragments on the same input."""
    fragments = {"word": 0, "token": 0}
    for case in nq_cases[:3]:
        for granularity in fragments:
            res = engine.compress(case.documents, question=case.question, rate=0.2, granularity=granularity)
            for i in res.order:
                fragments[granularity] += len(_words(res.contexts[i].text) - _words(case.documents[i]))
            assert 0.2 * 0.85 <= res.rate <= 0.2 * 1.15
    assert fragments["word"] == 0
    assert fragments["token"] > 0


def test_hybrid_ranking_beats_the_small_lm_alone(engine, nq_cases):
    """On real cases BM25 evidence fused in ranks the gold passage higher than the 135M
    LM's question perplexity does (and the LM alone is the paper's LongLLMLingua)."""
    from lingua_integrations.evaluation.quality import gold_ranks

    hybrid = gold_ranks(engine, nq_cases, "hybrid")
    perplexity = gold_ranks(engine, nq_cases, "perplexity")
    assert sum(hybrid) < sum(perplexity), (hybrid, perplexity)
    assert sum(r == 0 for r in hybrid) >= sum(r == 0 for r in perplexity)


def test_evidence_keeps_answers_at_20x(engine, nq_cases):
    """At rate 0.05 whole-document selection plus token pruning loses most answers;
    keeping the question's sentences first keeps more of them, within the budget."""
    from lingua_integrations.evaluation import contains_answer
    from lingua_integrations.evaluation.quality import format_documents

    kept = {True: 0, False: 0}
    for case in nq_cases:
        docs = format_documents(case)
        for evidence in kept:
            res = engine.compress(docs, question=case.question, rate=0.05, evidence=None if evidence else False)
            kept[evidence] += contains_answer("\n".join(c.text for c in res.contexts), case.answers)
            assert res.rate <= 0.05 * 1.15
    assert kept[True] > kept[False], kept


def test_quality_harness_runs_every_method_family(engine, nq_rows, tmp_path):
    from lingua_integrations.evaluation import build_cases, load_rows
    from lingua_integrations.evaluation.quality import (gsm8k_demonstrations, markdown, numbers_kept, run_gsm8k,
                                                        run_nq, summarize)

    cases = build_cases(nq_rows, 1, seed=3)
    methods = ["ours default", "bm25 top documents", "random word drop", "selective-context"]
    samples = run_nq(cases, [0.33], methods, engine)
    assert {s.method for s in samples} == set(methods)
    for s in samples:
        assert s.answer_kept in (True, False)
        assert 0.0 < s.achieved <= 0.33 * 1.2, s
    assert next(s for s in samples if s.method == "ours default").gold_kept is not None

    rows = load_rows(SHARED / "data" / "gsm8k-train.jsonl.gz")
    demos = gsm8k_demonstrations(rows, pool=300, seed=0)
    assert len(demos) == 8 and not any("<<" in d for d in demos)
    lines = [d.count("\n") for d in demos]
    assert lines == sorted(lines, reverse=True)  # the most complex solutions first
    # original: 3 + 4 = 7 7 (six items); kept: 3 + = 7 (four of them)
    assert numbers_kept("3 + 4 = 7 and 7", "3 + = 7") == pytest.approx(4 / 6)
    gsm = run_gsm8k([demos[:3]], [0.5], ["ours default", "random word drop"], engine)
    assert all(0.0 <= s.numbers_kept <= 1.0 for s in gsm)
    table = markdown(summarize(samples + gsm))
    assert "| ours default |" in table and "GSM8K" in table and re.search(r"rate 0\.33", table)


def test_evidence_keeps_forced_documents(engine, nq_cases):
    """A document the caller forces survives the evidence step (whole before pruning)."""
    from lingua_integrations.evaluation.quality import format_documents

    case = nq_cases[1]
    docs = format_documents(case)
    worst = engine.rank(docs, case.question)[-1].index
    res = engine.compress(docs, question=case.question, rate=0.05, force_context_ids=[worst])
    assert res.contexts[worst].kept and worst in res.order
    assert res.rate <= 0.05 * 1.15 or res.contexts[worst].compressed_tokens > 0.05 * res.origin_tokens
