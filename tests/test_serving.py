"""The device layer (runner) and the cross-caller batching (queue), on the real embedded
model and real NQ passages. On a GPU they also capture CUDA graphs (benchmarks/speed.py);
here they run eagerly on the CPU, with the same batching, padding and routing."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from lingua_integrations import CompressionEngine
from lingua_integrations.runner import SurprisalRunner


@pytest.fixture(scope="module")
def passages(nq_rows):
    return [r["text"] for r in nq_rows[:12]]


def test_padded_batch_scores_each_sequence_as_if_alone(engine, passages):
    """Right padding without a mask is exact for a causal LM: a token never sees what follows."""
    scorer = engine.scorer
    seqs = scorer.encode_many(passages[:6], special=True)
    assert len({len(s) for s in seqs}) > 1  # different lengths: the batch is padded
    runner = SurprisalRunner(engine.loaded.model, engine.loaded.lock, max_padding=None)  # one batch, any padding
    together = runner.surprisal(seqs, max_rows=6)
    assert runner.forward_passes == 1
    for ids, got in zip(seqs, together):
        alone, _ = scorer.surprisal(torch.tensor(ids))  # the KV-cache path, one sequence
        assert got.shape == (len(ids) - 1,)
        assert torch.allclose(got, alone.cpu(), atol=1e-3), float((got - alone.cpu()).abs().max())


def test_kv_cache_continues_under_the_keyword_this_transformers_takes(engine, passages):
    """The KV path passes its cache as ``cache`` where transformers has renamed
    ``past_key_values`` (the old keyword is deprecated, then removed), and continuing
    from a cache scores as one pass over everything does."""
    import warnings

    scorer = engine.scorer
    ids = torch.tensor(scorer.encode_many(passages[:1], special=True)[0])
    half = len(ids) // 2
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        whole, _ = scorer.surprisal(ids)
        first, cache = scorer.surprisal(ids[:half])
        rest, _ = scorer.surprisal(ids, cache, half)
    assert cache is not None and len(rest) == len(ids) - half - 1
    # whole[i] is token i+1's surprisal; the continuation starts at token half+1
    assert torch.allclose(first.cpu(), whole[: half - 1].cpu(), atol=1e-3)
    assert torch.allclose(rest.cpu(), whole[half:].cpu(), atol=1e-3)


def test_a_window_step_scores_only_from_the_window_it_judges(engine, passages):
    """A default-mode ITPC step rebuilds the just-compressed window's cache without its
    scores (``first``): the scores it returns are those of one pass over everything, and
    the cache covers every token, so the next step continues from it."""
    scorer = engine.scorer
    ids = torch.tensor(scorer.encode_many(passages[:1], special=True)[0])
    half, first = len(ids) // 3, 2 * len(ids) // 3
    whole, _ = scorer.surprisal(ids)
    _, cache = scorer.surprisal(ids[:half])
    tail, cache = scorer.surprisal(ids, cache, half, first)
    assert len(tail) == len(ids) - first
    assert torch.allclose(tail.cpu(), whole[first - 1 :].cpu(), atol=1e-3)
    assert cache.get_seq_length() == len(ids)
    more = torch.cat([ids, ids[1:9]])
    nxt, _ = scorer.surprisal(more, cache, len(ids))
    again, _ = scorer.surprisal(more)
    assert torch.allclose(nxt.cpu(), again[len(ids) :].cpu(), atol=1e-3)  # tokens len(ids)+1 on


def test_span_scoring_skips_the_head_before_the_span_and_matches(engine, passages):
    """Ranking needs only the question's surprisal after each document: ``starts`` gives
    just that span, the same numbers as scoring everything, with the LM head skipped
    before it; on the CPU a batch also stops growing before 10% of it is padding."""
    seqs = engine.scorer.encode_many(passages, special=True)
    starts = [len(s) // 2 for s in seqs[:-1]] + [len(seqs[-1])]  # the last: nothing to score
    runner = SurprisalRunner(engine.loaded.model, engine.loaded.lock)
    assert runner.max_padding == 0.1
    full = runner.surprisal(seqs, max_rows=8)
    before = runner.forward_passes
    spans = runner.surprisal(seqs, max_rows=8, starts=starts)
    passes = runner.forward_passes - before
    for ids, st, whole, span in zip(seqs, starts, full, spans):
        assert span.shape == (len(ids) - st,)
        assert torch.allclose(span, whole[st - 1 :], atol=1e-4)
    assert spans[-1].numel() == 0
    sizes = [len(s) for s in seqs[:-1]]
    assert max(sizes) / min(sizes) > 1.5  # mixed lengths: eleven of them would fill two 8-row batches
    assert passes > 2  # but not within 10% padding

def test_packed_rows_score_each_sequence_as_if_alone(engine, passages, nq_rows):
    """Packing (on by default on a GPU) lays short sequences end to end in a row with
    restarting position ids; the model must then keep them apart: same surprisals as
    padded batches, spans included, in fewer padded positions."""
    q = nq_rows[0]["question"]
    seqs = engine.scorer.encode_many([p + "\n" + q for p in passages], special=True)
    starts = [len(s) - 6 for s in seqs]  # the last tokens (the question's), as ranking scores them
    lock = engine.loaded.lock
    padded = SurprisalRunner(engine.loaded.model, lock, pack=False, max_padding=None)
    packed = SurprisalRunner(engine.loaded.model, lock, pack=True)
    assert SurprisalRunner(engine.loaded.model, lock).pack == "auto" and not packed._pack_ok
    for st in (None, starts):
        padded.positions_run = packed.positions_run = 0
        want = padded.surprisal(seqs, starts=st)
        got = packed.surprisal(seqs, starts=st)
        for ids, s, a, b in zip(seqs, st or [1] * len(seqs), want, got):
            assert b.shape == (len(ids) - s,)
            assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert packed._pack_ok  # the probe found the model honours packed position ids
    assert packed.positions_run < 0.8 * padded.positions_run  # mixed lengths: padding was a fifth or more


def test_variable_length_attention_over_packed_rows_scores_each_sequence_as_if_alone(engine, passages, nq_rows):
    """Packed rows' attention through sequence boundaries (the variable-length flash kernel on
    a GPU; here its exact per-sequence stand-in) instead of SDPA's block mask: a wrong
    boundary list would let a sequence see its neighbour or cut it short. Many short
    sequences fill rows up to their cap (SEQS_PER_ROW), long ones share rows with them."""
    import copy

    from lingua_integrations import packed_attention
    from lingua_integrations.runner import SEQS_PER_ROW

    model = copy.deepcopy(engine.loaded.model)  # installing switches this model's attention
    lock = threading.RLock()
    words = " ".join(passages).split()
    short = [" ".join(words[k : k + 3 + k % 5]) for k in range(0, 8 * 40, 8)]  # 40 sequences of 4-9 tokens
    seqs = engine.scorer.encode_many(passages[:4] + short, special=True)
    starts = [max(1, len(s) - 4) for s in seqs]
    want = SurprisalRunner(model, lock, pack=True, varlen=False).surprisal(seqs, starts=starts)
    assert model.config._attn_implementation == "sdpa"
    runner = SurprisalRunner(model, lock, pack=True, varlen=True)
    assert runner.varlen and model.config._attn_implementation == packed_attention.NAME
    seen = []
    layout = runner._layout
    runner._layout = lambda rows, shape: seen.append([len(r) for r in rows]) or layout(rows, shape)
    got = runner.surprisal(seqs, starts=starts)
    assert max(n for pass_rows in seen for n in pass_rows) == SEQS_PER_ROW  # the cap was reached
    for ids, s, a, b in zip(seqs, starts, want, got):
        assert b.shape == (len(ids) - s,)
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    # a forward without boundaries (KV-cache windows, padded batches) still runs SDPA with its mask
    ids = torch.tensor(seqs[0]).unsqueeze(0)
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, engine.loaded.model(input_ids=ids).logits, atol=1e-5)


def test_compiled_decoder_layers_score_as_the_eager_model(engine, passages):
    """Regional compilation (on by default where CUDA graphs are) fuses the decoder layers'
    small kernels: the same surprisals, on batches of several shapes from one compilation;
    with the compiler broken, the runner says so and scores uncompiled; a bad request
    fails as it would uncompiled and leaves compilation on."""
    import copy

    from lingua_integrations.compilation import regions

    seqs = engine.scorer.encode_many(passages[:6], special=True)
    lock = threading.RLock()
    model = copy.deepcopy(engine.loaded.model)  # compiled in place: not the shared engine's
    eager = SurprisalRunner(model, lock, compile=False, max_padding=None).surprisal(seqs, max_rows=3)
    assert SurprisalRunner(model, lock).compile is False  # "auto": off without CUDA graphs
    runner = SurprisalRunner(model, lock, compile=True, max_padding=None)
    got = runner.surprisal(seqs, max_rows=3)
    assert runner.forward_passes == 2 and runner.compile
    found = regions(model)
    assert len(found) == model.config.num_hidden_layers + 1  # the layers and the final norm
    assert all(m._compiled_call_impl is not None for m in found)
    for a, b in zip(eager, got):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())
    with pytest.raises(IndexError):  # the model's own error (an id outside the vocabulary) ...
        runner.surprisal([[0, 10**9]])
    assert runner.compile  # ... reaches the caller and is not taken for a compiler failure

    broken = copy.deepcopy(engine.loaded.model)
    runner = SurprisalRunner(broken, lock, compile=True)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        again = runner.surprisal(seqs[:1])
    assert not runner.compile and all(m._compiled_call_impl is None for m in regions(broken))
    assert torch.allclose(again[0], eager[0], atol=1e-3)


def test_cache_free_regions_compile_once_for_batches_and_kv_cache_passes(engine, passages):
    """Big models on a GPU compile only each layer's norms and MLP ("cache-free"): the
    same surprisals in batches and in KV-cache passes (ITPC's windows), which run them
    compiled, not forced eager as whole compiled layers are."""
    import copy
    import dataclasses

    from lingua_integrations.compilation import cache_free_regions, regions, uncompiled
    from lingua_integrations.scoring import CausalScorer

    seqs = engine.scorer.encode_many(passages[:4], special=True)
    lock = threading.RLock()
    model = copy.deepcopy(engine.loaded.model)
    eager = SurprisalRunner(model, lock, compile=False, max_padding=None).surprisal(seqs, max_rows=4)
    with pytest.raises(ValueError, match="compile must be"):
        SurprisalRunner(model, lock, compile="everything")
    runner = SurprisalRunner(model, lock, compile="cache-free", max_padding=None)
    got = runner.surprisal(seqs, max_rows=4)
    assert runner.compile == "cache-free"
    for a, b in zip(eager, got):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-3), float((a - b).abs().max())
    parts = cache_free_regions(model)
    layer = model.model.layers[0]
    assert len(parts) == 3 * model.config.num_hidden_layers + 1  # two norms and the MLP per layer, final norm
    assert layer.mlp in parts and layer.self_attn not in parts
    assert all(m._compiled_call_impl is not None for m in parts)
    assert all(m._compiled_call_impl is None for m in regions(model)[:-1])  # the layers themselves are not
    assert isinstance(uncompiled(model), contextlib.nullcontext)  # cached passes keep the compiled parts

    ids = torch.tensor(seqs[0])
    scorer = CausalScorer(dataclasses.replace(engine.loaded, model=model, lock=lock, _queue=None, _runner=None))
    head, cache = scorer.surprisal(ids[:40])
    tail, _ = scorer.surprisal(ids, cache, cached=40)  # tokens 41.. given the cached 0..39
    alone, _ = engine.scorer.surprisal(ids)  # the shared engine's uncompiled model, in one pass
    assert torch.allclose(head, alone[:39], atol=1e-3) and torch.allclose(tail, alone[40:], atol=1e-3)


def test_rotary_embedding_is_routed_through_a_compiled_copy_and_back(engine, passages, monkeypatch):
    """Cache-free compilation also fuses the attention's rotary embedding by replacing the
    modeling module's function: once per architecture, the original's numbers for CPU
    tensors, and the original back when compilation is undone."""
    import copy
    import sys

    from lingua_integrations.compilation import compile_regions, fuse_rotary

    model = engine.loaded.model
    modeling = sys.modules[type(model).__module__]
    current = modeling.apply_rotary_pos_emb  # routed already by an earlier test's cache-free runner?
    original = current.__wrapped__ if getattr(current, "_lingua_fused", False) else current
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", original)  # as if nothing had routed it yet
    ids = torch.tensor([engine.scorer.encode_many(passages[:1], special=True)[0]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        undo = fuse_rotary(model)
        routed = modeling.apply_rotary_pos_emb
        assert routed is not original and routed.__wrapped__ is original
        fuse_rotary(model)()  # a second model of this architecture: no second copy, nothing to undo
        assert modeling.apply_rotary_pos_emb is routed
        assert torch.equal(model(input_ids=ids).logits, before)  # CPU tensors: the original's kernels
        undo()
    assert modeling.apply_rotary_pos_emb is original
    other = copy.deepcopy(model)
    undo = compile_regions(other, "cache-free")  # what a big model's runner does on a GPU
    assert modeling.apply_rotary_pos_emb.__wrapped__ is original
    undo()
    assert modeling.apply_rotary_pos_emb is original


def test_itpc_without_kv_cache_keeps_the_same_tokens(engine, nq_rows):
    """The GPU path rescores each window's view instead of extending a KV cache: same output."""
    docs, q = [r["text"] for r in nq_rows[20:25]], nq_rows[20]["question"]
    recompute = CompressionEngine(device="cpu")
    recompute.scorer.kv_cache = False
    a = engine.compress(docs, question=q, rate=0.33)
    b = recompute.compress(docs, question=q, rate=0.33)
    assert a.compressed_prompt == b.compressed_prompt


def test_gpu_path_computes_the_head_only_where_scores_are_asked_for(engine, nq_rows):
    """On a GPU a small LM's calls go through the queue in packed rows and ITPC rescores
    each window's view; the LM head then runs only where a score is asked for (the
    question after each document when ranking, the tail a KV cache would have
    recomputed). That path here on the CPU: the same tokens as the KV-cache path."""
    docs, q = [r["text"] for r in nq_rows[20:30]], nq_rows[20]["question"]
    gpu_like = CompressionEngine(device="cpu")
    gpu_like.scorer.kv_cache = False
    gpu_like.scorer.use_queue = True
    runner = gpu_like.loaded.scoring_queue().runner  # the process's runner of this model: restore it
    pack = runner.pack
    runner.pack = True
    try:
        shares = {}
        for method in ("longllmlingua", "llmlingua"):
            a = engine.compress(docs, question=q, method=method, rate=0.33)
            runner.tokens_run = runner.head_positions = 0  # count the GPU-style call alone
            b = gpu_like.compress(docs, question=q, method=method, rate=0.33)
            assert a.compressed_prompt == b.compressed_prompt, method
            shares[method] = runner.head_positions / runner.tokens_run
    finally:
        runner.pack = pack
    assert runner._gather_ok  # the probe found the model's logits are its head over the decoder's states
    # without gathering the head runs at every token read and at padding (a share of ~1.0 or
    # more); LongLLMLingua's ranking scores only the question after each document (measured
    # 0.57); LLMLingua's ranking scores every token, so only ITPC's window steps save (0.93)
    assert shares["longllmlingua"] < 0.8 and shares["llmlingua"] < 1.0


def test_graph_passes_keep_padding_rows_and_row_widths_small(engine):
    """With CUDA graphs a pass runs in a bucketed shape (rows rounded up to a power of two),
    so the runner cuts packed rows into passes that are at most an eighth padding rows; and
    a row is as wide as its sequences' length class, since attention costs a row's width
    squared. Only shapes are computed here: nothing runs."""
    runner = SurprisalRunner(engine.loaded.model, engine.loaded.lock, max_positions=8192)
    runner.graphs = True
    for n in range(1, 130):
        passes = runner._passes(list(range(n)), 42)
        assert [i for p in passes for i in p] == list(range(n))  # every row once, in order
        assert all(len(p) <= 42 for p in passes)
        padded = sum(runner._shape(len(p), 64)[0] for p in passes)
        assert (padded - n) * 8 <= padded, (n, [len(p) for p in passes])
    assert [runner._row_width(n) for n in (24, 150, 334, 600, 1600, 8192)] == [512, 512, 512, 768, 2048, 8192]


@pytest.fixture(params=[1, 2], ids=["serial-rounds", "two-rounds-in-flight"])
def queue_depth(request, engine):
    """The engine's queue with ``depth`` 1 (the default) and 2 (rounds overlap), restored after."""
    queue = engine.loaded.scoring_queue()
    before, queue.depth = queue.depth, request.param
    yield queue
    queue.depth = before


def test_queue_batches_concurrent_requests_and_routes_results(engine, passages, queue_depth):
    queue = queue_depth
    seqs = engine.scorer.encode_many(passages, special=True)
    alone = [queue.runner.surprisal([s])[0] for s in seqs]
    rounds0, results, barrier = queue.rounds, {}, threading.Barrier(len(seqs))

    def ask(k):
        with queue.session():
            barrier.wait()
            results[k] = queue.surprisal([seqs[k]])[0]

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(seqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller never got its result"
    assert queue.rounds - rounds0 < len(seqs), "requests were not batched together"
    for k, expected in enumerate(alone):
        assert torch.allclose(results[k], expected, atol=1e-3)


def test_a_lone_calls_requests_run_in_its_own_thread(engine, passages, monkeypatch):
    """With no other call in progress and nothing queued, a request skips the queue's
    threads (two hand-offs per ITPC step) and gives the same surprisals."""
    queue = engine.loaded.scoring_queue()
    seq = engine.scorer.encode_many(passages[:1], special=True)[0]
    expected = queue.runner.surprisal([seq])[0]
    ran_in, launch = [], queue.runner.launch_surprisal

    def spy(*args, **kwargs):
        ran_in.append(threading.current_thread())
        return launch(*args, **kwargs)

    monkeypatch.setattr(queue.runner, "launch_surprisal", spy)
    with queue.session():
        got = queue.surprisal([seq])[0]
    assert ran_in == [threading.current_thread()]
    assert torch.allclose(got, expected, atol=1e-3)


def until(condition, what: str) -> None:
    """Wait (at most 30 s) for ``condition``, failing with ``what``."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_admission_lets_max_active_calls_in_first_come_first_served(engine, passages):
    """On a GPU only a few calls run at once (more fight over the GIL): the rest wait at
    the door of ``session`` in arrival order; a nested session of an admitted thread
    does not wait; every admitted call still gets its own surprisals."""
    from lingua_integrations.serving import ScoringQueue

    with pytest.raises(ValueError, match="max_active"):
        ScoringQueue(engine.loaded.scoring_queue().runner, max_active=0)
    queue = ScoringQueue(engine.loaded.scoring_queue().runner, max_active=2)
    waiting = queue._admission._waiting
    seqs = engine.scorer.encode_many(passages[:4], special=True)
    expected = queue.runner.surprisal(seqs)
    gates = [threading.Event() for _ in range(4)]  # each caller holds its place until its gate opens
    inside, entered, results, lock = [0], [], {}, threading.Lock()
    peak = [0]

    def call(k):
        with queue.session():
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                entered.append(k)
            gates[k].wait(60)
            with queue.session():  # nested: already admitted
                results[k] = queue.surprisal([seqs[k]])[0]
            with lock:
                inside[0] -= 1

    threads = []
    for k in range(4):  # one by one, so the arrival order is 0, 1, 2, 3
        threads.append(threading.Thread(target=call, args=(k,)))
        threads[-1].start()
        if k < 2:
            until(lambda: len(entered) == k + 1, "a caller was not let in while there was room")
        else:
            until(lambda: len(waiting) == k - 1, "a caller did not wait at the door")
    assert entered == [0, 1]  # two inside, two waiting
    gates[0].set()  # one place frees: the first to arrive of the two waiting gets it
    until(lambda: len(entered) == 3, "the freed place was not passed on")
    assert entered[2] == 2 and len(waiting) == 1
    for gate in gates[1:]:
        gate.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert entered == [0, 1, 2, 3] and peak[0] == 2
    for k in range(4):
        assert torch.allclose(results[k], expected[k], atol=1e-3)


def test_changing_max_active_admits_or_holds_waiting_callers(engine):
    """Host workers raise the limit while callers wait at the door: those that now fit go
    in at once; a lowered limit holds the door until enough holders have left."""
    from lingua_integrations.serving import ScoringQueue

    queue = ScoringQueue(engine.loaded.scoring_queue().runner, max_active=1)
    admission = queue._admission
    inside, leave = [], {k: threading.Event() for k in range(4)}

    def call(k):
        with queue.session():
            inside.append(k)
            leave[k].wait(60)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    threads[0].start()
    until(lambda: inside == [0], "the first caller was not let in")
    for k in (1, 2, 3):
        threads[k].start()
        until(lambda: len(admission._waiting) == k, "a caller did not wait at the door")
    queue.max_active = 3  # two of the three waiting fit now
    until(lambda: sorted(inside) == [0, 1, 2], "a raised limit did not admit the waiting callers")
    assert len(admission._waiting) == 1
    queue.max_active = 1  # three inside, one waiting: it waits until the others have all left
    leave[0].set()
    time.sleep(0.2)
    assert len(inside) == 3 and len(admission._waiting) == 1, "a place passed on above the lowered limit"
    leave[1].set()
    time.sleep(0.2)
    assert len(admission._waiting) == 1
    leave[2].set()
    until(lambda: 3 in inside, "the last holder's place was not passed on")
    leave[3].set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(ValueError, match="max_active"):
        queue.max_active = 0


def test_a_failing_request_fails_only_its_caller(engine, passages, queue_depth):
    queue = queue_depth
    good = engine.scorer.encode_many(passages[:3], special=True)
    bad = [0, 10**9]  # an id far outside the vocabulary: the embedding lookup raises
    outcomes, barrier = {}, threading.Barrier(4)

    def ask(k, seq):
        with queue.session():
            barrier.wait()
            try:
                outcomes[k] = queue.surprisal([seq])[0]
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                outcomes[k] = exc

    threads = [threading.Thread(target=ask, args=(k, s)) for k, s in enumerate(good + [bad])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert isinstance(outcomes[3], Exception)
    assert all(isinstance(outcomes[k], torch.Tensor) and len(outcomes[k]) == len(good[k]) - 1 for k in range(3))
    # and the queue still serves
    assert len(queue.surprisal([good[0]])[0]) == len(good[0]) - 1


def test_concurrent_mixed_calls_match_one_by_one(nq_rows, tmp_path):
    """32 threads and 32 asyncio tasks on one shared engine, three methods mixed, plus
    callers that raise mid-batch and a cancelled task: every completed call returns
    exactly what the same call returns alone, and nothing deadlocks."""
    from lingua_integrations.evaluation.nq import build_minilm_token_classifier

    classifier = build_minilm_token_classifier(tmp_path / "clf")
    engine = CompressionEngine.shared(device="cpu", llmlingua2_model=str(classifier))
    methods = ["llmlingua", "longllmlingua", "llmlingua2"]
    calls = []
    for k in range(64):
        row = nq_rows[100 + 3 * k]
        docs = [nq_rows[100 + 3 * k + j]["text"][:300] for j in range(3)]
        calls.append((docs, row["question"], methods[k % 3], 0.3 + 0.05 * (k % 5)))

    def run(call):
        docs, q, method, rate = call
        return engine.compress(docs, question=q, method=method, rate=rate).compressed_prompt

    expected = [run(c) for c in calls]

    results: dict[int, str] = {}
    errors: list[Exception] = []

    def thread_call(k):
        results[k] = run(calls[k])
        if k % 8 == 0:  # a caller whose next call is bad, while others are mid-batch
            try:
                engine.compress(calls[k][0], rate=1.5)
            except ValueError as exc:
                errors.append(exc)

    async def main():
        async def task_call(k):
            results[k] = await asyncio.to_thread(run, calls[k])

        doomed = asyncio.create_task(asyncio.to_thread(run, calls[0]))
        tasks = [asyncio.create_task(task_call(k)) for k in range(32, 64)]
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=900)

    threads = [threading.Thread(target=thread_call, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    asyncio.run(main())
    for t in threads:
        t.join(timeout=900)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 4 and all("rate must be in (0, 1]" in str(e) for e in errors)
    assert [results[k] for k in range(64)] == expected
