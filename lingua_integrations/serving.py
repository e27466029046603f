"""Serving many callers: one device batch for the scoring work of concurrent calls.

The algorithms (ranking, ITPC) run in their callers' threads and ask for surprisals
one step at a time. On a GPU, 64 callers each running their own forward passes would
queue 64 small launch-bound passes per step; :class:`ScoringQueue` instead collects
the requests that arrive together, scores them in one padded batch under a token
budget (:class:`~.runner.SurprisalRunner`) and routes each result back.

It waits for more requests only while other calls are in progress (``session``) and at
most ``max_wait`` seconds, so a lone caller pays no latency; a lone call's request, with
nothing else queued or on the device, runs in the caller's own thread. A failing batch is retried
request by request, so one bad request fails only its caller.

**Rounds may overlap.** One thread gathers and launches rounds, another waits for their
device passes and hands the results back, and up to ``depth`` rounds are on the device at
once. With ``depth=2``, while round k runs, the callers it does not serve send their next
requests and round k+1 is gathered, laid out and queued behind it. The calls in flight hold
one request each, so the gathering does not wait for the callers whose requests are already
on the device. Measured, it does not pay: H100, SmolLM2 shape, 64 callers with 64 host
workers, in one run (``benchmarks/speed.py``, run 11 in ``docs/benchmarks.md``) depth 2 gave
4.05x the calls one at a time, depth 1 4.34x; the overlapped rounds were more and smaller
(18 against 13): a round launched while another runs goes with the requests at hand.
The default is therefore 1: each round runs to the end before the next is gathered.

**Admission.** A call's own work between device rounds (tokenizing, ranking, the ITPC
bookkeeping: ~30 ms of Python per 20-document call) holds the GIL. With 64 callers all
running at once, threads hand the GIL around so often that the process burns twice the
CPU time and the worker that launches the device batches waits its turn behind them:
on an H100, 64 concurrent SmolLM2-shape calls took as long as running them one by one.
``max_active`` therefore lets only a few calls run at once (first come, first served);
the rest wait at the door of ``session``. Measured there: 2 or 3 active calls 1.34-1.36x
the throughput of one at a time, 4: 1.25x, 8: 1.29x, all 64: 1.00x. Host workers
(:mod:`.workers`) take the calls' Python out of this process: while they run, the limit
rises to their number.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import torch

from .runner import SurprisalRunner

logger = logging.getLogger(__name__)

# a lone call's ITPC streams shorter than this are rescored from scratch rather than pooled:
# on an H100 (SmolLM2 shape) the pooled steps of one 2k-token call took 30-39 ms against
# 30 ms from scratch, of a 6.7k-token LongLLMLingua call 113 against 130 ms; with other calls
# in progress the pool wins (64 callers, 16 workers: 0.92 -> 0.75 s)
POOL_ALONE_MIN = 4096


class _Request:
    __slots__ = ("seqs", "starts", "pooled", "done", "result", "error")

    def __init__(self, seqs: list[torch.Tensor], starts: list[int], pooled: list[tuple] | None = None) -> None:
        self.seqs = seqs
        self.starts = starts
        self.pooled = pooled  # items for SurprisalRunner.pooled_surprisal (then seqs is empty)
        self.done = threading.Event()
        self.result: list[torch.Tensor] | None = None
        self.error: BaseException | None = None


class _Admission:
    """At most ``limit`` holders at once (None: no limit), admitted in arrival order."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._held = 0
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if not self._waiting and (self.limit is None or self._held < self.limit):
                self._held += 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # release() hands its place straight to us

    def release(self) -> None:
        with self._lock:
            if self._waiting and (self.limit is None or self._held <= self.limit):
                self._waiting.popleft().set()  # the place passes on: _held stays
            else:
                self._held -= 1

    def set_limit(self, limit: int | None) -> None:
        """Change the limit; a higher one admits waiting callers at once (a lower one
        takes effect as holders leave)."""
        with self._lock:
            self.limit = limit
            while self._waiting and (limit is None or self._held < limit):
                self._held += 1
                self._waiting.popleft().set()


class ScoringQueue:
    """Batches surprisal requests of concurrent callers onto one runner.

    Args:
        runner: does the device work.
        max_wait: longest a request waits for others to join its batch (seconds).
        max_tokens: most sequence tokens gathered into one round (the runner splits a
            round into passes under its own budget).
        max_active: most calls in progress at once (see the module doc; None: no limit).
            A thread already in a session is not held at the door again.
        depth: most rounds launched on the device and not yet handed back (see the module
            doc); 1 (the default, the faster one measured) runs each round to the end before
            gathering the next.
    """

    def __init__(self, runner: SurprisalRunner, max_wait: float = 0.004, max_tokens: int = 262144,
                 max_active: int | None = None, depth: int = 1) -> None:
        if max_active is not None and max_active < 1:
            raise ValueError(f"max_active must be at least 1 (or None for no limit), got {max_active}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (rounds on the device at once), got {depth}")
        self.runner = runner
        self.max_wait = max_wait
        self.max_tokens = max_tokens
        self.depth = depth
        self._admission = _Admission(max_active)
        self._local = threading.local()  # this thread's session depth
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._active = 0
        self._in_flight = 0  # requests launched whose results are not handed back yet
        self._rounds_in_flight = 0
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)  # a round was handed back
        self._worker: threading.Thread | None = None
        self.idle_exit = 2.0  # seconds
        self.rounds = 0  # diagnostics: batches run
        self.requests = 0

    @property
    def max_active(self) -> int | None:
        return self._admission.limit

    @max_active.setter
    def max_active(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"max_active must be at least 1 (or None for no limit), got {limit}")
        self._admission.set_limit(limit)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Mark a call in progress (waiting first while ``max_active`` others are): while
        others are in progress, requests wait briefly for company."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._admission.acquire()
            with self._lock:
                self._active += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._lock:
                    self._active -= 1
                self._admission.release()

    def surprisal(self, seqs: Sequence[torch.Tensor], starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Like :meth:`SurprisalRunner.surprisal`, batched with whatever other callers ask now."""
        if not seqs:
            return []
        if starts is not None and len(starts) != len(seqs):
            raise ValueError(f"{len(starts)} starts given for {len(seqs)} sequences")
        return self._submit(_Request([torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs],
                                     [1] * len(seqs) if starts is None else [int(st) for st in starts]))

    # -- streams with their keys and values in the runner's pool ---------------------
    @property
    def pooling(self) -> bool:
        """Whether ITPC streams may keep their KV cache in the runner's pool."""
        return self.runner.pooling

    def allocate(self, n: int) -> int | None:
        """A pool region of ``n`` slots, or None: score from scratch (no room, or a short
        stream of a lone call, see :data:`POOL_ALONE_MIN`)."""
        with self._lock:
            alone = self._active <= 1
        if alone and n < POOL_ALONE_MIN:
            return None
        return self.runner.kv_pool().allocate(n)

    def release(self, region: int) -> None:
        """Give a pool region back (its stream's call is over)."""
        self.runner.kv_pool().release(region)

    def pooled_surprisal(self, items: Sequence[tuple[int, int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Like :meth:`SurprisalRunner.pooled_surprisal`, in one pass with whatever other
        callers' streams ask now."""
        if not items:
            return []
        return self._submit(_Request([], [], [(int(r), int(c), torch.as_tensor(x, dtype=torch.long).reshape(-1),
                                               int(f)) for r, c, x, f in items]))

    def _submit(self, request: _Request) -> list[torch.Tensor]:
        with self._lock:
            # a lone call with nothing queued or running has no one to wait for: its request runs
            # in its own thread (no hand-off to the queue's threads and back, ~0.1 ms a step, and
            # a 60-passage call takes ~30 steps); one arriving meanwhile is not held up by it
            direct = self._active <= 1 and not self._in_flight and self._queue.empty()
            if direct:
                self._in_flight += 1
                self.rounds += 1
                self.requests += 1
        if direct:
            try:
                self._launch_round([request])()
            finally:
                with self._lock:
                    self._in_flight -= 1
        else:
            self._queue.put(request)
            self._ensure_worker()  # after the put: a worker that is exiting checks the queue under the lock
            request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    # -- the worker -----------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="lingua-scoring", daemon=True)
                self._worker.start()

    def _gather(self, first: _Request) -> list[_Request]:
        batch, tokens = [first], _tokens(first)
        deadline = time.monotonic() + self.max_wait
        while tokens < self.max_tokens:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:  # calls whose requests are on the device send nothing until handed back
                    others_running = self._active > len(batch) + self._in_flight
                left = deadline - time.monotonic()
                if not others_running or left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            batch.append(nxt)
            tokens += _tokens(nxt)
        return batch

    def _serve(self) -> None:
        """The launching thread: gather a round, start its device work, pass it to the
        handing-back thread; at most ``depth`` rounds at once."""
        launched: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._hand_back, args=(launched,), name="lingua-scoring-results", daemon=True).start()
        try:
            while True:
                with self._slot_free:
                    while self._rounds_in_flight >= self.depth:
                        self._slot_free.wait()
                try:  # an idle worker exits (and lets the model be freed); the next request restarts it
                    first = self._queue.get(timeout=self.idle_exit)
                except queue.Empty:
                    with self._lock:
                        if self._queue.empty():
                            self._worker = None
                            return
                    continue
                batch = self._gather(first)
                with self._lock:
                    self._in_flight += len(batch)
                    self._rounds_in_flight += 1
                self.rounds += 1
                self.requests += len(batch)
                launched.put((batch, self._launch_round(batch)))
        finally:
            launched.put(None)  # the handing-back thread ends after the rounds before it

    def _hand_back(self, launched: queue.SimpleQueue) -> None:
        """The handing-back thread: wait for each launched round in order and give its
        callers their results (or errors)."""
        while True:
            item = launched.get()
            if item is None:
                return
            batch, finish = item
            try:
                finish()
            finally:
                with self._lock:
                    self._in_flight -= len(batch)
                    self._rounds_in_flight -= 1
                    self._slot_free.notify()
                for r in batch:
                    r.done.set()

    def _launch(self, requests: list[_Request]) -> Callable[[], list[torch.Tensor]]:
        """Start the device work of requests of one kind (all pooled, or none); returns the
        function that waits for it and gives their results, flattened in order."""
        if requests[0].pooled is not None:
            return self.runner.launch_pooled([item for r in requests for item in r.pooled])
        return self.runner.launch_surprisal([s for r in requests for s in r.seqs],
                                            starts=[st for r in requests for st in r.starts])

    def _launch_round(self, batch: list[_Request]) -> Callable[[], None]:
        """Start a round's device work (plain requests, then pooled ones); returns the
        function that waits for it and sets each request's result or error. A group that
        fails, launched or waited for, is retried request by request there."""
        started = []
        for group in ([r for r in batch if r.pooled is None], [r for r in batch if r.pooled is not None]):
            if group:
                try:
                    started.append((group, self._launch(group)))
                except BaseException:  # noqa: BLE001 - retried request by request below
                    started.append((group, None))

        def finish() -> None:
            for group, wait in started:
                try:
                    if wait is None:
                        raise RuntimeError("the group's launch failed")
                    flat = wait()
                    pos = 0
                    for r in group:
                        n = len(r.pooled) if r.pooled is not None else len(r.seqs)
                        r.result, pos = flat[pos : pos + n], pos + n
                except BaseException:  # noqa: BLE001 - isolate the request that fails
                    for r in group:
                        try:
                            r.result = self._launch([r])()
                        except BaseException as exc:  # noqa: BLE001 - delivered to its caller
                            r.error = exc
        return finish


def _tokens(request: _Request) -> int:
    if request.pooled is not None:
        return sum(len(x) for _, _, x, _ in request.pooled)
    return sum(len(s) for s in request.seqs)
