"""ITPC in a static KV cache (the path a big model takes on a GPU, where each window
replays a captured CUDA graph) against the dynamic cache: the same tokens survive.

On the CPU the static path runs eagerly (no graphs), which checks what the graphs
replay: write positions reset per window instead of cropping, right-padded windows,
explicit rotary positions, attention limited to the slots a window needs, caches
reused across calls."""

from __future__ import annotations

import pytest

from lingua_integrations.compat import PromptCompressor
from lingua_integrations.kv_graphs import StaticPool, StaticUnavailable, StaticWindows

LONG = dict(rate=0.5, condition_in_question="after_condition", reorder_context="sort",
            dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100",
            rank_method="longllmlingua")


def _run(pc: PromptCompressor, case, all_methods: bool = True) -> list[str]:
    docs = case.documents[:12]  # at rate 0.5, kept text for several ITPC windows
    out = [pc.compress_prompt(docs, question=case.question, **LONG)["compressed_prompt"]]  # two streams
    if all_methods:
        out.append(pc.compress_prompt(docs, rate=0.5)["compressed_prompt"])
        out.append(pc.engine.compress(docs, question=case.question, rate=0.5).compressed_prompt)
    return out


@pytest.fixture(scope="module")
def compressor(engine):
    pc = PromptCompressor(device_map="cpu")
    assert pc.engine.scorer is engine.scorer and engine.scorer.kv_cache  # the shared model, KV-cache ITPC
    return pc


def test_static_cache_keeps_the_same_tokens_as_the_dynamic_cache(compressor, nq_cases, monkeypatch):
    sc = compressor.engine.scorer
    dynamic = _run(compressor, nq_cases[0])
    static = StaticPool(sc.model, sc.loaded.lock, sc.loaded.max_positions, 0, enabled=True)
    monkeypatch.setattr(sc, "static", static)
    steps = []
    score = StaticWindows.surprisal
    monkeypatch.setattr(StaticWindows, "surprisal", lambda self, ids, cached: steps.append(cached) or score(self, ids, cached))
    assert _run(compressor, nq_cases[0]) == dynamic
    # the windows were scored in the static cache, continuing from cached prefixes, with
    # no fallback; its caches wait for the next call
    assert len(steps) >= 6 and max(steps) > 0
    assert static.enabled and sum(len(v) for v in static._free.values()) >= 2
    # attention read only part of a cache (the same tokens survived): a span below a
    # cache's length, and the full length when a window reached into its last slots
    caches = [w for free in static._free.values() for w in free]
    assert any(min(w.spans_used) < w.length for w in caches)


def test_a_failing_static_path_falls_back_to_the_dynamic_cache(compressor, nq_cases, monkeypatch):
    sc = compressor.engine.scorer
    dynamic = _run(compressor, nq_cases[1], all_methods=False)
    static = StaticPool(sc.model, sc.loaded.lock, sc.loaded.max_positions, 0, enabled=True)
    monkeypatch.setattr(sc, "static", static)

    def fail(self, new_ids, cached):  # what a failed graph capture or an OOM raises
        raise StaticUnavailable("capture failed")

    monkeypatch.setattr(StaticWindows, "surprisal", fail)
    assert _run(compressor, nq_cases[1], all_methods=False) == dynamic
    assert not static.enabled and not static._free  # turned off for later calls, caches freed
