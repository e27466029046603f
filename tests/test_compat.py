"""The drop-in PromptCompressor against the reference llmlingua 0.2.2.

The reference runs in its own environment (transformers 4.46.3, installed by
``tools/reference/setup.sh``) as a subprocess, on the same converted SmolLM2 weights,
fp32, CPU, the same 20-document NQ cases and the reference's LongLLMLingua parameters.
"""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import REFERENCE_ENV

LONG = dict(rate=0.33, condition_in_question="after_condition", reorder_context="sort",
            dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100",
            rank_method="longllmlingua")
PLAIN = dict(rate=0.33)
KEYS = {"compressed_prompt", "origin_tokens", "compressed_tokens", "ratio", "rate", "saving"}


def word_f1(a: str, b: str) -> float:
    ca, cb = Counter(a.split()), Counter(b.split())
    common = sum((ca & cb).values())
    if not common:
        return float(a.split() == b.split())
    p, r = common / sum(ca.values()), common / sum(cb.values())
    return 2 * p * r / (p + r)


def doc_order(prompt: str, documents: list[str]) -> list[int]:
    """Which documents appear, in prompt order, identified by their first words' position."""
    found = []
    for i, d in enumerate(documents):
        head = " ".join(d.split()[:4])
        pos = prompt.find(head)
        if pos >= 0:
            found.append((pos, i))
    return [i for _, i in sorted(found)]


@pytest.fixture(scope="module")
def reference_results(nq_cases):
    from lingua_integrations.evaluation.reference import run_reference
    from lingua_integrations.models import materialize_embedded

    requests = []
    for case in nq_cases[:5]:
        requests.append({"context": case.documents, "question": case.question, "kwargs": LONG})
        requests.append({"context": case.documents, "question": "", "kwargs": PLAIN})
    results = run_reference(requests, materialize_embedded("smollm2-135m"), "cpu", env_dir=REFERENCE_ENV)
    assert all(r["transformers"].startswith("4.46") for r in results)
    return requests, results


@pytest.mark.reference
def test_same_tokens_and_document_order_as_the_reference(reference_results):
    from lingua_integrations import PromptCompressor

    requests, reference = reference_results
    pc = PromptCompressor(device_map="cpu")
    f1s, same_order = [], []
    for req, ref in zip(requests, reference):
        ours = pc.compress_prompt(req["context"], question=req["question"], **req["kwargs"])
        assert KEYS <= set(ours)
        f1s.append(word_f1(ours["compressed_prompt"], ref["compressed_prompt"]))
        same_order.append(doc_order(ours["compressed_prompt"], req["context"])
                          == doc_order(ref["compressed_prompt"], req["context"]))
        assert ours["origin_tokens"] == ref["origin_tokens"]
    assert sum(f1s) / len(f1s) >= 0.95, f1s
    assert sum(same_order) / len(same_order) >= 0.9, same_order


def test_reference_keys_and_formats(engine):
    from lingua_integrations import PromptCompressor

    pc = PromptCompressor(device_map="cpu")
    res = pc(["A first short context about rivers and lakes in Finland.", "A second one about mountains in Chile."],
             question="Where are the lakes?", rate=0.5)
    assert set(res) == KEYS
    assert res["ratio"].endswith("x") and res["rate"].endswith("%") and "Saving $" in res["saving"]
    assert pc.engine is engine  # same engine, hence the same loaded model, as every other compressor
    with pytest.raises(ValueError, match="needs a question"):
        pc.compress_prompt(["x"], rank_method="longllmlingua")
    with pytest.raises(ValueError, match="rank_method"):
        pc.compress_prompt(["x", "y"], question="q", rank_method="bm25")
    with pytest.raises(TypeError, match="unexpected"):
        pc.compress_prompt(["x"], not_an_option=1)


def test_structured_compress_prompt_keeps_uncompressed_spans(engine):
    from lingua_integrations import PromptCompressor

    pc = PromptCompressor(device_map="cpu")
    res = pc.structured_compress_prompt(
        ["<llmlingua, compress=False>Keep this sentence exactly.</llmlingua><llmlingua, rate=0.3> and then a long "
         "rambling passage about the weather and many other details of little interest to anyone.</llmlingua>"],
        rate=0.5,
    )
    assert "Keep this sentence exactly." in res["compressed_prompt"]
    assert "<llmlingua" not in res["compressed_prompt"]
