"""The pooled KV cache of ITPC window steps (kv_pool.py), on the real SmolLM2 and NQ text.

On a GPU a small LM's window steps are batched across callers; with the pool each step
runs only its new tokens against its stream's keys in the pool. On the CPU the same
passes run through the exact per-sequence stand-in of the flash kernel, so the pooled
path must give what the CPU's own dynamic KV cache gives: the same compressed prompts.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lingua_integrations import CompressionEngine, packed_attention, serving
from lingua_integrations.compat import PromptCompressor
from lingua_integrations.kv_pool import KVPool


@pytest.fixture(scope="module")
def cases(nq_rows):
    rows = nq_rows[120:150]
    return [([r["text"] for r in rows[6 * k : 6 * k + 6]], rows[6 * k]["question"]) for k in range(3)]


@pytest.fixture()
def pooled(monkeypatch):
    """An engine on the GPU small-model path (windows batched, no dynamic cache) with the
    pool switched on, for short lone calls too; the shared model and runner are put back
    afterwards."""
    monkeypatch.setattr(serving, "POOL_ALONE_MIN", 0)
    engine = CompressionEngine(device="cpu")
    model, runner = engine.loaded.model, engine.loaded.scoring_queue().runner
    saved = runner.varlen, runner.pool_kv
    assert packed_attention.install(model, force=True)
    runner.varlen = runner.pool_kv = True  # "auto" leaves both off on a CPU; the stand-in is exact
    try:
        yield engine, runner
    finally:
        runner.varlen, runner.pool_kv = saved
        model.set_attn_implementation("sdpa")


def _batched(engine: CompressionEngine) -> None:
    engine.scorer.kv_cache = False
    assert engine.scorer.pooled is engine.loaded.scoring_queue().runner.pool_kv


def test_allocator_reuses_and_merges_freed_regions(engine):
    pool = KVPool(engine.loaded.model, capacity=100)
    a, b, c = pool.allocate(40), pool.allocate(40), pool.allocate(20)
    assert (a, b, c) == (0, 40, 80) and pool.allocate(1) is None  # full: the caller scores from scratch
    pool.release(a)
    pool.release(b)  # merged with a's region: 80 slots in one piece
    assert pool.allocate(80) == 0 and pool.in_use == 100
    pool.release(0)
    pool.release(c)
    assert pool.in_use == 0 and pool.allocate(100) == 0
    assert pool.k.shape[1] == 101  # the scratch slot for padding's writes


def test_two_pooled_steps_give_the_surprisals_of_the_whole_sequence(pooled, nq_rows):
    engine, runner = pooled
    ids = torch.tensor(engine.tokenizer(" ".join(r["text"] for r in nq_rows[:3])).input_ids[:300])
    other = torch.tensor(engine.tokenizer(nq_rows[5]["text"]).input_ids[:90])
    pool = runner.kv_pool()
    r1, r2 = pool.allocate(len(ids)), pool.allocate(len(other))
    try:
        # both streams in each pass: the second step attends to the pool, not to the other stream
        a = runner.pooled_surprisal([(r1, 0, ids[:200], 1), (r2, 0, other[:50], 1)])
        b = runner.pooled_surprisal([(r2, 50, other[50:], 1), (r1, 200, ids[200:], 5)])
    finally:
        pool.release(r1)
        pool.release(r2)
    whole, whole_other = runner.surprisal([ids, other])  # tokens 1 .. n-1
    # a step scores from the token after its first new one (the one before has no logits in it)
    torch.testing.assert_close(torch.cat([a[0], b[1]]), torch.cat([whole[:199], whole[204:]]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([a[1], b[0]]), torch.cat([whole_other[:49], whole_other[50:]]),
                               atol=1e-4, rtol=1e-4)


def test_pooled_window_steps_compress_as_the_dynamic_cache_does(pooled, cases):
    engine, runner = pooled
    for docs, question in cases:
        engine.scorer.kv_cache = True  # the CPU's own path: a dynamic cache extended window by window
        want = engine.compress(docs, question=question, rate=0.35)
        _batched(engine)
        before = runner.positions_run
        got = engine.compress(docs, question=question, rate=0.35)
        pooled_positions = runner.positions_run - before
        assert got.compressed_prompt == want.compressed_prompt
        runner.pool_kv = False  # from scratch, as before the pool: every step reran its prefix
        before = runner.positions_run
        engine.compress(docs, question=question, rate=0.35)
        assert runner.positions_run - before > 1.3 * pooled_positions
        runner.pool_kv = True
    assert runner.kv_pool().in_use == 0  # every stream gave its region back


def test_a_lone_short_call_is_scored_from_scratch_unless_others_are_in_progress(pooled, cases, monkeypatch):
    """A single short call's pooled steps are slower than rescoring on an H100 (launches,
    not positions, bound it); with other calls in progress, pooling wins."""
    engine, runner = pooled
    monkeypatch.setattr(serving, "POOL_ALONE_MIN", 4096)
    _batched(engine)
    monkeypatch.setattr(engine.scorer, "use_queue", True)  # calls in sessions, as on a GPU
    queue = engine.loaded.scoring_queue()
    docs, question = cases[2]
    engine.compress(docs, question=question, rate=0.35)  # the ranking memo: each call below ranks alike
    before = runner.positions_run
    alone = engine.compress(docs, question=question, rate=0.35)  # ~1k tokens: below the minimum
    alone_positions = runner.positions_run - before
    runner.pool_kv = False
    before = runner.positions_run
    engine.compress(docs, question=question, rate=0.35)
    assert runner.positions_run - before == alone_positions  # as from scratch
    runner.pool_kv = True

    entered, leave = threading.Event(), threading.Event()

    def other_call() -> None:
        with queue.session():
            entered.set()
            leave.wait(60)

    other = threading.Thread(target=other_call)
    other.start()
    try:
        assert entered.wait(10)
        before = runner.positions_run
        beside = engine.compress(docs, question=question, rate=0.35)
        assert 1.3 * (runner.positions_run - before) < alone_positions  # pooled
    finally:
        leave.set()
        other.join()
    assert beside.compressed_prompt == alone.compressed_prompt
    with queue.session():  # alone again: only a long stream gets a region
        assert queue.allocate(100) is None
        region = queue.allocate(4096)
        assert region is not None
        queue.release(region)
    assert runner.kv_pool().in_use == 0


def test_the_drop_in_compresses_through_the_pool_as_with_the_dynamic_cache(pooled, cases):
    engine, runner = pooled
    pc = PromptCompressor(device_map="cpu")
    assert pc.engine.loaded is engine.loaded  # one model per process: the pool switched on above
    docs, question = cases[0]
    outs = []
    saved = pc.engine.scorer.kv_cache  # the drop-in's engine is the process's shared one: put it back
    try:
        for kv in (True, False):
            pc.engine.scorer.kv_cache = kv
            outs.append([pc.compress_prompt(docs, rate=0.35)["compressed_prompt"],
                         pc.compress_prompt(docs, question=question, rate=0.35, condition_in_question="after_condition",
                                            condition_compare=True, rank_method="longllmlingua",
                                            reorder_context="sort")["compressed_prompt"]])
    finally:
        pc.engine.scorer.kv_cache = saved
    assert outs[0] == outs[1]
    assert runner.kv_pool().in_use == 0


def test_workers_hold_pool_regions_for_their_calls_only(pooled, cases):
    engine, runner = pooled
    _batched(engine)
    engine.scorer.use_queue = True
    docs, question = cases[1]
    here = engine.compress(docs, question=question, rate=0.35)
    requests = engine.loaded.scoring_queue().requests
    engine.start_workers(1)
    try:
        via = engine.compress(docs, question=question, rate=0.35)
    finally:
        engine.stop_workers()
    assert via.compressed_prompt == here.compressed_prompt
    assert engine.loaded.scoring_queue().requests > requests  # scored here, for the worker
    assert runner.kv_pool().in_use == 0


def test_a_bucketed_pass_pads_without_touching_the_streams(pooled, nq_rows):
    """What a captured graph runs: the layout padded to bucketed sizes (padding tokens
    write to the scratch slot, empty sequences fill the boundary lists, the head's index
    list is padded) gives the surprisals of the exact layout."""
    from lingua_integrations.kv_pool import PooledPass

    engine, runner = pooled
    seqs = [torch.tensor(engine.tokenizer(nq_rows[k]["text"]).input_ids[:n]) for k, n in ((7, 130), (8, 61), (9, 97))]
    pool = runner.kv_pool()
    regions = [pool.allocate(len(s)) for s in seqs]
    try:
        runner.pooled_surprisal([(r, 0, s[:40], 1) for r, s in zip(regions, seqs)])
        items = [(r, 40, s[40:], 3) for r, s in zip(regions, seqs)]
        key, host, sizes = runner._pooled_layout(items, graphs=True)
        width, _, lists, _, head, _ = key
        assert width > sum(len(x) for _, _, x, _ in items) and lists == 16 and head >= sum(sizes)
        ids, pos, slots, keys, cu_q, cu_k, flat = host
        padded = runner._pooled_loss(ids.view(1, -1), pos.view(1, -1), flat,
                                     PooledPass(pool, slots, keys, cu_q, cu_k, key[3], key[5]))
        exact = runner.pooled_surprisal(items)  # the same new tokens again: the same keys rewritten
    finally:
        for r in regions:
            pool.release(r)
    torch.testing.assert_close(padded[: sum(sizes)], torch.cat(exact), atol=1e-4, rtol=1e-4)


def test_the_probe_turns_the_pool_off_where_queries_are_misaligned(pooled, monkeypatch):
    """A kernel whose causal mask, with fewer queries than keys, starts at the first key
    (the second step's queries then see only the first keys) fails the probe, and windows
    are rescored from scratch instead."""
    from lingua_integrations import kv_pool

    _, runner = pooled
    runner._pool_ok = None
    assert runner.pooling  # the exact stand-in passes
    exact = kv_pool.stand_in

    def start_aligned(q, k, v, cu_q, cu_k, scale):
        ends = cu_k.clone()
        ends[1:] = torch.minimum(cu_k[1:], cu_k[:-1] + (cu_q[1:] - cu_q[:-1]))  # keys cut to the queries' count
        out = torch.zeros_like(q)
        for (a, b), (c, _) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), ends.tolist()[1:])):
            if b > a:
                out[a:b] = exact(q[a:b], k[c : c + b - a], v[c : c + b - a], torch.tensor([0, b - a]),
                                 torch.tensor([0, b - a]), scale)
        return out

    monkeypatch.setattr(kv_pool, "stand_in", start_aligned)
    runner._pool_ok = None
    try:
        assert not runner.pooling
    finally:
        runner._pool_ok = None
