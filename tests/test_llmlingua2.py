"""LLMLingua-2 on a real encoder (MiniLM with a seeded keep/drop head, built here) and
real NQ text: mechanics, any tokenizer, question-aware ranking, and the reference."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REFERENCE_ENV
from lingua_integrations import CompressionEngine, PromptCompressor
from lingua_integrations.compat import _reference_sizes, _window_percentiles
from lingua_integrations.evaluation.nq import build_minilm_token_classifier
from lingua_integrations.evaluation.reference import run_reference
from lingua_integrations.token_classification import TokenClassifier, _pieces, _stream_groups, greedy_take, prepare

WORD = re.compile(r"\w+|[^\w\s]")


@pytest.fixture(scope="module")
def l2_dir(tmp_path_factory):
    # a name without 'bert-base-multilingual-cased' or 'xlm-roberta-large': ours must not care
    return build_minilm_token_classifier(tmp_path_factory.mktemp("models") / "my-minilm-compressor", seed=0)


@pytest.fixture(scope="module")
def l2_engine(l2_dir):
    return CompressionEngine.shared(device="cpu", llmlingua2_model=str(l2_dir))


def test_keeps_the_most_probable_words_in_order_at_the_rate(l2_engine, nq_rows):
    docs = [r["text"] for r in nq_rows[:8]]
    # keep_names_and_numbers=False: the paper's order, by keep probability alone
    res = l2_engine.compress(docs, method="llmlingua2", rate=0.33, use_context_level_filter=False,
                             force_tokens=["?"], return_words=True, keep_names_and_numbers=False)
    assert res.method == "llmlingua2"
    assert 0.33 * 0.85 <= res.rate <= 0.33 * 1.15
    for i in res.kept_indices:
        ctx = res.contexts[i]
        words = ctx.words
        kept = [w for w, _, k in words if k]
        # kept words are the original words, in order
        it = iter(w for w, _, _ in words)
        assert all(any(k == w for w in it) for k in kept)
        # the kept ones are the most probable (forced words aside): no dropped word beats the
        # least probable kept one by much (the budget is filled greedily in target tokens)
        kept_p = [p for w, p, k in words if k and w != "?"]
        dropped_p = [p for _, p, k in words if not k]
        assert sum(kept_p) / len(kept_p) > sum(dropped_p) / len(dropped_p)
        assert "".join(WORD.findall(ctx.text)) == "".join(w for w in kept if not w.isspace()).replace(" ", "")


def test_force_tokens_digits_and_newlines(l2_engine, nq_rows):
    text = nq_rows[0]["text"] + "\nWho won? " + nq_rows[1]["text"]
    res = l2_engine.compress(text, method="llmlingua2", rate=0.2, force_tokens=["\n", "?"], force_reserve_digit=True)
    out = res.compressed_prompt
    assert "?" in out and "\n" in out
    assert re.findall(r"\d+", text) == re.findall(r"\d+", out)  # every number kept, in order


def test_question_aware_llmlingua2_ranks_with_the_causal_lm(l2_engine, nq_cases):
    case = nq_cases[0]
    res = l2_engine.compress(case.documents, question=case.question, method="llmlingua2", rate=0.33)
    assert res.method == "llmlingua2"
    ranks = [res.contexts[i].rank for i in res.kept_indices]
    assert ranks == sorted(ranks) and None not in ranks  # ranked by LongLLMLingua, best first
    assert len(res.kept_indices) < len(case.documents)  # coarse selection dropped some
    assert 0.33 * 0.85 <= res.rate <= 0.33 * 1.15
    assert res.compressed_prompt.endswith(case.question)


def test_any_tokenizer_byte_level_bpe(engine, tmp_path, nq_rows):
    """A RoBERTa-style classifier with a byte-level BPE tokenizer (SmolLM2's): word
    boundaries still come out right, with no name-based rules."""
    import torch
    from transformers import RobertaConfig, RobertaForTokenClassification

    torch.manual_seed(1)
    cfg = RobertaConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=128, num_labels=2, max_position_embeddings=520, pad_token_id=2)
    d = tmp_path / "tiny-bpe-classifier"
    RobertaForTokenClassification(cfg).save_pretrained(d)
    engine.tokenizer.save_pretrained(d)
    eng = CompressionEngine.shared(device="cpu", llmlingua2_model=str(d))
    text = nq_rows[2]["text"]
    res = eng.compress(text, method="llmlingua2", rate=0.5, return_words=True)
    words = [w for w, _, _ in res.contexts[0].words]
    assert all(w and w == w.strip() for w in words)  # no leading-space pieces as words
    assert "".join(words) == "".join(text.split())  # every character of every word, in order
    assert len(words) >= len(text.split())  # at least one word per whitespace-separated chunk


def test_bad_llmlingua2_use():
    eng = CompressionEngine(device="cpu", llmlingua2_model="./no/such/classifier")
    with pytest.raises(ValueError, match="not a directory"):
        eng.compress(["some text"], method="llmlingua2")


def _f1(a: str, b: str) -> float:
    ca, cb = Counter(WORD.findall(a.lower())), Counter(WORD.findall(b.lower()))
    common = sum((ca & cb).values())
    return 0.0 if not common else 2 * common / (sum(ca.values()) + sum(cb.values()))


@pytest.mark.reference
def test_same_words_as_the_reference(l2_dir, nq_rows, tmp_path):
    # the reference picks its word rules from the *name*; give it one it knows
    ref_dir = tmp_path / "bert-base-multilingual-cased-minilm-seeded"
    shutil.copytree(l2_dir, ref_dir)
    kwargs = dict(rate=0.33, force_tokens=["\n", "?"])
    requests = [{"context": [nq_rows[i]["text"]], "kwargs": kwargs} for i in range(20, 26)]
    requests += [{"context": [r["text"] for r in nq_rows[30 + 10 * k : 40 + 10 * k]], "kwargs": kwargs} for k in range(3)]
    reference = run_reference(requests, ref_dir, "cpu", llmlingua2=True, env_dir=REFERENCE_ENV)
    pc = PromptCompressor(model_name=str(l2_dir), device_map="cpu", use_llmlingua2=True)
    f1s = []
    for req, ref in zip(requests, reference):
        ours = pc.compress_prompt(req["context"], **req["kwargs"])
        assert {"compressed_prompt", "compressed_prompt_list", "origin_tokens", "compressed_tokens", "ratio", "rate",
                "saving"} <= set(ours)
        assert ours["origin_tokens"] == ref["origin_tokens"]
        f1s.append(_f1(ours["compressed_prompt"], ref["compressed_prompt"]))
    assert sum(f1s) / len(f1s) >= 0.99, f1s


def test_drop_in_llmlingua2_options(l2_dir, nq_rows):
    pc = PromptCompressor(model_name=str(l2_dir), device_map="cpu", use_llmlingua2=True)
    docs = [r["text"] for r in nq_rows[40:46]]
    res = pc.compress_prompt(docs, rate=0.33, use_context_level_filter=True, return_word_label=True,
                             force_tokens=["\n", "?"], drop_consecutive=True)
    assert len(res["compressed_prompt_list"]) < len(docs)  # context filter dropped some
    labels = res["fn_labeled_original_prompt"].split("\t\t|\t\t")
    assert all(item.rsplit(" ", 1)[1] in ("0", "1") for item in labels)
    res2 = pc.compress_prompt_llmlingua2(docs, target_token=100)
    assert res2["compressed_tokens"] <= 130


def test_adapters_take_llmlingua2(l2_dir, nq_rows):
    from langchain_core.documents import Document
    from pydantic import ValidationError

    from lingua_integrations.langchain import LinguaDocumentCompressor

    with pytest.raises(ValidationError, match="llmlingua2"):
        LinguaDocumentCompressor(method="llmlingua-2")
    c = LinguaDocumentCompressor(method="llmlingua2", llmlingua2_model=str(l2_dir), rate=0.4, device_map="cpu")
    docs = [Document(page_content=r["text"], metadata={"row": i}) for i, r in enumerate(nq_rows[50:56])]
    out = c.compress_documents(docs, nq_rows[50]["question"])
    assert out and all(d.metadata["lingua"]["method"] == "llmlingua2" for d in out)
    assert all(d.metadata["row"] == docs[d.metadata["lingua"]["index"]].metadata["row"] for d in out)


def test_cli_llmlingua2(l2_dir, nq_rows):
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_integrations", "--method", "llmlingua2", "--llmlingua2-model", str(l2_dir),
         "--device", "cpu", "--rate", "0.33"],
        input=json.dumps({"context": [r["text"] for r in nq_rows[60:63]]}) + "\n", capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 0.33 * 0.85 <= out["compressed_tokens"] / out["origin_tokens"] <= 0.33 * 1.15
    bad = subprocess.run([sys.executable, "-m", "lingua_integrations", "--method", "llmlingua2", "--llmlingua2-model",
                          "./no/such/classifier"], input='{"context": ["text"]}\n', capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "not a directory" in bad.stderr


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_window_percentiles_are_numpys_percentile_of_the_repeated_values(data):
    # the drop-in's per-window cut, computed for all windows at once, must be the very float
    # np.percentile gives on each window's repeated values (a word's keep/drop hangs on it)
    n = data.draw(st.integers(1, 60))
    values = np.array(data.draw(st.lists(st.floats(0, 1) | st.sampled_from([0.0, 0.5, 1.0]), min_size=n,
                                         max_size=n)))
    repeats = np.array(data.draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), dtype=np.int64)
    window = np.sort(np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))))
    _, window = np.unique(window, return_inverse=True)
    percent = data.draw(st.integers(0, 100))
    got = _window_percentiles(values, repeats, window, percent)
    for w in range(int(window.max()) + 1):
        expected = float(np.percentile(np.repeat(values[window == w], repeats[window == w]), percent))
        assert got[w] == expected, (w, got[w], expected)


def test_words_are_worked_on_while_the_encoder_runs(l2_dir, nq_rows):
    # submit() hands the words over before their probabilities: forcing and counting them
    # then must give what classify()-then-prepare gives, and each word's model view must be
    # the tokenizer's own join of its sub-tokens (long words and inserted line breaks too)
    pc = PromptCompressor(model_name=str(l2_dir), device_map="cpu", use_llmlingua2=True)
    clf, tok = pc.engine.classifier, pc.tokenizer
    texts = ["\n".join(r["text"] for r in nq_rows[50:56]) + "\nAntidisestablishmentarianism 1,250.5?",
             nq_rows[57]["text"]]
    pending = clf.submit(texts)
    assert all(not ct.probs.any() for ct in pending.texts)
    prepare(pending.texts, ["\n", "?"], True)
    views = [_reference_sizes(ct, pc.oai_count, tok) for ct in pending.texts]
    early = pending.wait()
    late = clf.classify(texts)
    prepare(late, ["\n", "?"], True)
    for a, b, (view, sizes) in zip(early, late, views):
        assert a.words == b.words and (a.forced == b.forced).all()
        assert np.allclose(a.probs, b.probs) and (a.probs[a.tok_hi > a.tok_lo] > 0).all()
        expected = [w if hi == lo else tok.convert_tokens_to_string(tok.convert_ids_to_tokens(
                    a.token_ids[lo:hi].tolist())) for w, lo, hi in zip(a.words, a.tok_lo.tolist(), a.tok_hi.tolist())]
        assert view.tolist() == expected
        assert sizes.tolist() == [1 if v.isspace() else max(1, pc.oai_count(v)) for v in expected]
    lengths = early[0].tok_hi - early[0].tok_lo
    assert (lengths > 3).any() and (lengths == 0).any()  # the one-by-one path ran: a long word, a line break


def test_streamed_windows_are_those_of_one_tokenizer_call(l2_dir, nq_rows):
    # with cheap launches (CUDA graphs) a long text is tokenized in growing groups of pieces
    # and each group's decided windows go to the device at once; the windows, words and
    # probabilities must be those of tokenizing everything in one call (forced here on the CPU)
    pc = PromptCompressor(model_name=str(l2_dir), device_map="cpu", use_llmlingua2=True)
    loaded = pc.engine.classifier.loaded
    long_text = "\n".join(r["text"] for r in nq_rows[:120])
    texts = [long_text, nq_rows[130]["text"], "", long_text[:20000]]
    assert len(_stream_groups(len(_pieces(long_text)))) == 2  # the text really goes in two tokenizer calls
    whole = TokenClassifier(loaded, stream=False).classify(texts)
    streamed = TokenClassifier(loaded, stream=True).classify(texts)
    for a, b in zip(whole, streamed):
        for name in ("starts", "ends", "chunks", "tok_lo", "tok_hi", "token_ids"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert np.allclose(a.probs, b.probs, atol=1e-5)
    assert len(np.unique(whole[0].chunks)) > 20 and not len(whole[2])


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), max_size=40), room=st.floats(0, 60), first_always=st.booleans())
def test_greedy_take_is_the_sequential_greedy_fill(sizes, room, first_always):
    # the rule, item by item: take each item that still fits; the first one regardless with
    # first_always. greedy_take must take exactly these (it stops scanning early). Items are
    # words' target tokens: callers leave zero-size words (bare line breaks) out
    expected, spent = [], 0.0
    for j, size in enumerate(sizes):
        take = spent + size <= room or (first_always and j == 0)
        expected.append(take)
        spent += size if take else 0
    assert greedy_take(np.array(sizes, dtype=np.int64), room, first_always).tolist() == expected
