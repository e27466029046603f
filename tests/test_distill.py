"""LLMLingua-2 data distillation, every step for real: teacher calls (a scripted chat
model stands in for a remote LLM), annotation, filtering, training the real MiniLM
encoder on real NQ passages, loading the result, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

from lingua_integrations import CompressionEngine
from lingua_integrations.distill import (TrainConfig, annotate, chunk_text, distill, filter_annotations, run_teacher,
                                         train_compressor)
from lingua_integrations.evaluation.nq import minilm_dir

# a teacher with a rule a student can learn and we can check: delete these function words
STOP = {"the", "a", "an", "of", "in", "on", "and", "to", "is", "was", "for", "by", "with", "as", "at", "its", "it",
        "that", "from", "which", "are", "be", "or", "were", "has", "had", "this", "their"}


def deleting_teacher(text: str) -> str:
    return " ".join(w for w in text.split() if w.lower().strip(".,;:()\"'") not in STOP)


def test_annotation_matches_the_papers_city_manager_example():
    """shared/seeds/001 (LLMLingua-2 review): GPT-4's compression of the sentence and the
    sliding-window labels it gives every word."""
    original = ("The City Manager recommends adopting three resolutions for environmental sustainability programs "
                "to promote energy efficiency and solar initiatives in the community.")
    compressed = "City Manager recommends three resolutions for sustainability, energy efficiency, solar initiatives."
    expected = {"The": False, "City": True, "Manager": True, "recommends": True, "adopting": False, "three": True,
                "resolutions": True, "for": True, "environmental": False, "sustainability": True,
                "programs": False, "to": False, "promote": False, "energy": True, "efficiency": True, "and": False,
                "solar": True, "initiatives": True, "in": False, "the": False, "community": False}
    a = annotate(original, compressed)
    got = {w: label for w, label in zip(a.words, a.labels) if w != "."}
    assert list(got) == list(expected) and got == expected
    assert a.variation_rate == 0.0 and a.alignment_gap == 0.0


def test_filters_drop_paraphrasing_and_reordering_teachers(nq_rows):
    texts = [r["text"] for r in nq_rows[:6]]
    faithful = [annotate(t, deleting_teacher(t)) for t in texts]
    paraphrased = [annotate(texts[0], "In short, this passage talks about several unrelated things we summarise.")]
    reordered = [annotate(texts[1], " ".join(reversed(deleting_teacher(texts[1]).split())))]
    refused = [annotate(texts[2], "")]
    kept, report = filter_annotations(faithful + paraphrased + reordered + refused)
    assert kept == faithful
    assert report.kept == 6 and sum(report.dropped.values()) == 3
    assert any("variation" in k for k in report.dropped) and any("alignment" in k for k in report.dropped)
    assert paraphrased[0].variation_rate > 0.5 and reordered[0].alignment_gap > 0.3


def test_teacher_step_with_a_chat_model_is_concurrent_retried_and_resumable(tmp_path, nq_rows):
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    chunks = [r["text"] for r in nq_rows[:5]]
    cache = tmp_path / "teacher.jsonl"
    calls, lock, failed_once = [], threading.Lock(), set()

    class Scripted(GenericFakeChatModel):
        def invoke(self, messages, *args, **kwargs):  # the system message must carry the instruction
            system, human = messages[0][1], messages[1][1]
            assert "do not reorder" in system.lower()
            with lock:
                calls.append(human)
                if human not in failed_once:  # every chunk fails once: retries must recover
                    failed_once.add(human)
                    raise ConnectionError("rate limited")
            return AIMessage(content=deleting_teacher(human))

    model = Scripted(messages=iter([]))
    answers = run_teacher(chunks, model, cache, concurrency=4, retries=2, backoff=0.01)
    assert answers == [deleting_teacher(c) for c in chunks]
    assert len(calls) == 10
    again = run_teacher(chunks + [nq_rows[5]["text"]], model, cache, concurrency=4, retries=2, backoff=0.01)
    assert again[:5] == answers and again[5] == deleting_teacher(nq_rows[5]["text"])
    assert len(calls) == 12  # only the new chunk was asked (once failing, once answering)


def test_chunks_are_whole_sentences_under_the_limit(engine, nq_rows):
    text = " ".join(r["text"] for r in nq_rows[:8])
    chunks = chunk_text(text, engine.count, max_tokens=200)
    assert len(chunks) > 2 and all(engine.count(c) <= 200 or "." not in c[:-1] for c in chunks)
    assert re.sub(r"\s+", " ", " ".join(chunks)) == re.sub(r"\s+", " ", text).strip()


def test_training_learns_the_teachers_rule_and_the_engine_loads_it(tmp_path, nq_rows):
    texts = [r["text"] for r in nq_rows[200:260]]
    samples, report = filter_annotations([annotate(t, deleting_teacher(t)) for t in texts])
    assert report.kept == len(texts)
    result = train_compressor(samples, str(minilm_dir()), tmp_path / "student",
                              TrainConfig(epochs=3, learning_rate=3e-4, train_layers=2, device="cpu"))
    best = result.history[result.best_epoch - 1]
    assert best["eval_keep_f1"] > 0.9, result.history  # the rule is learnable: a real model learnt it
    engine = CompressionEngine(device="cpu", llmlingua2_model=result.out_dir)
    held_out = nq_rows[300]["text"]
    res = engine.compress([held_out], method="llmlingua2", rate=0.6, return_words=True)
    words = res.contexts[0].words
    stop_p = [p for w, p, _ in words if w.lower() in STOP]
    content_p = [p for w, p, _ in words if w.isalpha() and w.lower() not in STOP]
    assert sum(stop_p) / len(stop_p) < sum(content_p) / len(content_p) - 0.3


def test_one_command_distils_from_documents_and_a_chat_model(tmp_path, nq_rows):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in nq_rows[400:440]))
    (tmp_path / "my_llms.py").write_text(
        "from langchain_core.language_models.fake_chat_models import GenericFakeChatModel\n"
        "from langchain_core.messages import AIMessage\n"
        f"STOP = {sorted(STOP)!r}\n"
        "class Chat(GenericFakeChatModel):\n"
        "    def invoke(self, messages, *a, **k):\n"
        "        text = messages[-1][1]\n"
        "        return AIMessage(content=' '.join(w for w in text.split() if w.lower().strip('.,;:()') not in STOP))\n"
        "def chat():\n"
        "    return Chat(messages=iter([]))\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lingua_integrations", "distill", "--documents", "docs.jsonl", "--teacher",
         "my_llms:chat", "--base-model", str(minilm_dir()), "--out", "out", "--epochs", "2", "--train-layers", "1",
         "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["answered"] == summary["chunks"] >= 40
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert len((tmp_path / "out" / "teacher.jsonl").read_text().splitlines()) == summary["chunks"]


def test_distill_rejects_unusable_input(tmp_path):
    with pytest.raises(TypeError, match="list of texts"):
        distill("one string", deleting_teacher, str(minilm_dir()), tmp_path)
    with pytest.raises(ValueError, match="usable samples"):
        distill(["Paris is the capital of France."] * 3, lambda t: "Completely different words here.",
                str(minilm_dir()), tmp_path)


def test_the_default_llmlingua2_model_is_offline_and_small(nq_rows):
    from pathlib import Path

    import lingua_integrations

    delta = Path(lingua_integrations.__file__).parent / "assets" / "minilm-l6-smollm2.safetensors"
    assert delta.is_file() and delta.stat().st_size < 5 * 2**20
    engine = CompressionEngine.shared(device="cpu")
    docs = [r["text"] for r in nq_rows[20:26]]
    res = engine.compress(docs, question=nq_rows[20]["question"], method="llmlingua2", rate=0.33, ranking="bm25")
    assert abs(res.rate - 0.33) < 0.05 and res.method == "llmlingua2"
