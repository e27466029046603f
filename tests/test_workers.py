"""Host workers (``engine.start_workers``): calls' Python in other processes, their device
work in this one. Real embedded model, real NQ passages, real worker processes.

Workers serve the GPU path of a small LM (windows rescored from scratch, every request
through the scoring queue); here that path runs on the CPU, set on the parent's scorer
as on a GPU, so a call run by a worker must give exactly what it gives in this thread.
"""

from __future__ import annotations

import threading

import pytest

from lingua_integrations import CompressionEngine


@pytest.fixture(scope="module")
def served():
    """An engine on the GPU small-model path, with two host workers."""
    engine = CompressionEngine(device="cpu")
    engine.scorer.kv_cache = False  # as on a GPU: views rescored in shared batches
    engine.scorer.use_queue = True
    queue = engine.loaded.scoring_queue()
    engine.start_workers(2)
    yield engine, queue
    engine.stop_workers()


@pytest.fixture(scope="module")
def calls(nq_rows):
    rows = nq_rows[40:70]
    return [([r["text"] for r in rows[5 * k : 5 * k + 5]], rows[5 * k]["question"], method)
            for k, method in enumerate(["longllmlingua", "llmlingua", "longllmlingua", "longllmlingua"])]


def _run(engine, call):
    docs, question, method = call
    return engine.compress(docs, question=question, method=method, rate=0.35)


def test_workers_return_the_calling_threads_output_and_score_here(served, calls):
    engine, queue = served
    requests0 = queue.requests
    via = [_run(engine, c) for c in calls]
    assert queue.requests > requests0, "the workers' device work did not come through this process's queue"
    engine.stop_workers()
    try:
        here = [_run(engine, c) for c in calls]
    finally:
        engine.start_workers(2)
    for a, b in zip(via, here):
        assert a.compressed_prompt == b.compressed_prompt
        assert a.order == b.order and [c.text for c in a.contexts] == [c.text for c in b.contexts]


def test_concurrent_callers_share_the_workers(served, calls):
    """Six threads, two workers: every caller gets its own call's output."""
    engine, _ = served
    alone = [_run(engine, c).compressed_prompt for c in calls]
    jobs = calls + calls[:2]
    results: dict[int, str] = {}

    def call(k):
        results[k] = _run(engine, jobs[k]).compressed_prompt

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert [results[k] for k in range(len(jobs))] == alone + alone[:2]


def test_errors_come_back_as_themselves(served, calls):
    engine, _ = served
    docs, question, _ = calls[0]
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
        engine.compress(docs, question=question, rate=1.5)  # raised in a worker
    with pytest.raises(TypeError, match=r"context\[1\] is function"):
        engine.compress([docs[0], lambda: 0], question=question)  # cannot be pickled: checked here
    assert _run(engine, calls[0]).compressed_prompt  # the workers still serve


def test_clear_rankings_reaches_every_worker(served, calls):
    """A worker memoises rankings like the engine: a repeated call skips its ranking
    requests until ``clear_rankings``, which clears each worker's memo."""
    engine, queue = served
    engine.clear_rankings()

    def requests_of(call) -> int:
        before = queue.requests
        _run(engine, call)
        return queue.requests - before

    first = requests_of(calls[2])
    for _ in range(2):  # both workers (taken in turn) have now seen it
        repeat = requests_of(calls[2])
    assert repeat < first
    engine.clear_rankings()
    assert [requests_of(calls[2]) for _ in range(2)] == [first, first]


def test_a_dead_worker_is_retired_and_calls_go_on(served, calls):
    engine, _ = served
    workers = engine.host_workers
    victim = workers._all[0]
    victim.process.kill()
    victim.process.join(10)
    expected = _run(engine, calls[1]).compressed_prompt
    for _ in range(3):  # whichever worker is taken, the call completes (a dead idle one is skipped)
        assert _run(engine, calls[1]).compressed_prompt == expected
    assert workers.alive == 1
    engine.stop_workers()
    engine.start_workers(2)


def test_start_workers_refuses_what_they_cannot_serve(engine):
    """The CPU's default path extends a KV cache in this process: workers would not help."""
    with pytest.raises(ValueError, match="GPU"):
        engine.start_workers(2)
    cpu_gpu_path = CompressionEngine(device="cpu")
    cpu_gpu_path.scorer.kv_cache = False
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="processes"):
            cpu_gpu_path.start_workers(bad)
    unpicklable = CompressionEngine(device="cpu", token_counter=lambda text: len(text.split()))
    unpicklable.scorer.kv_cache = False
    with pytest.raises(ValueError, match="picklable"):
        unpicklable.start_workers(1)


def test_a_script_without_a_main_guard_gets_told(tmp_path):
    """Workers import the main module: an unguarded script would start workers from each
    worker; the parent's error must say how to fix it, not show a broken pipe."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from lingua_integrations import CompressionEngine\n"
        "engine = CompressionEngine(device='cpu')\n"
        "engine.scorer.kv_cache = False\n"
        "engine.start_workers(1)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert 'if __name__ == "__main__":' in run.stderr.splitlines()[-1], run.stderr[-2000:]


def test_workers_serve_a_model_switched_to_variable_length_attention(calls):
    """On a GPU the runner switches the model to packed_attention's kernel, so the config a
    worker builds its meta-device copy from names an attention function that only this
    process had registered (an H100 run failed on it). The worker must start and give the
    calling thread's output; here the boundaries run through the CPU's exact stand-in."""
    from lingua_integrations import packed_attention

    engine = CompressionEngine(device="cpu")
    engine.scorer.kv_cache = False
    engine.scorer.use_queue = True
    model, runner = engine.loaded.model, engine.loaded.scoring_queue().runner
    varlen, pack, layout, packed_rows = runner.varlen, runner.pack, runner._layout, []
    try:
        assert packed_attention.install(model, force=True)
        runner.varlen = runner.pack = True  # "auto" leaves both off on a CPU; the stand-in is exact
        runner._layout = lambda rows, shape: packed_rows.append(max(map(len, rows))) or layout(rows, shape)
        here = _run(engine, calls[0])
        engine.start_workers(1)
        via = _run(engine, calls[0])
        assert via.compressed_prompt == here.compressed_prompt
        assert max(packed_rows) > 1, "no row held several sequences: the boundaries were not exercised"
    finally:
        engine.stop_workers()
        # the model and its runner are shared with this process's other engines
        runner.varlen, runner.pack = varlen, pack
        del runner._layout
        model.set_attn_implementation("sdpa")
