"""Host workers: the Python of concurrent calls in other processes, their device work here.

A 20-document LongLLMLingua call on an H100 (SmolLM2-135M shape) spends ~21 ms waiting
on the device and ~32 ms in its own Python: tokenizing, BM25, the layout, the budget
controller's and ITPC's bookkeeping. Threads share one interpreter lock, so 64 calls
from 64 threads run that Python one at a time, and batching their device work (the
:class:`~.serving.ScoringQueue`) cannot make them much faster than running them in turn.

:meth:`CompressionEngine.start_workers <.engine.CompressionEngine.start_workers>` moves
that Python into worker processes, the split vLLM makes between its API server and its
engine core. The model stays in this process, loaded once. A worker holds only the
tokenizer and the model's configuration (its weights on PyTorch's ``meta`` device: no
memory, no CUDA); every surprisal it needs comes back here as token ids, where the
calling thread hands it to the model's scoring queue, which batches it with the other
workers' requests and returns the surprisals. A call's arguments, its requests and its
result cross the process boundary pickled (a few kilobytes a request).

Workers serve the LLMLingua and LongLLMLingua methods of a small LM (the model's ITPC
windows go in shared batches: rescored from scratch, or, where the runner keeps a pooled
KV cache (:mod:`.kv_pool`), continued from a region of the pool that this process
allocates for the worker's call and takes back when the call ends, however it ends). A model over 1B parameters extends a KV cache on the device window
by window, which a worker cannot hold, and its calls are bound by device arithmetic
anyway; LLMLingua-2 and the drop-in ``PromptCompressor`` run in the calling thread.

Workers are forked from a ``forkserver`` (``spawn`` where there is none): never from
this process, which may hold CUDA state, and without each worker importing torch and
transformers again (a fresh interpreter took 10-15 s for that on the H100 machine, and
eight starting at once took 91 s in all). A script that starts workers needs the usual
``if __name__ == "__main__":`` guard: each worker imports the main module.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .engine import CompressionEngine, CompressionResult

logger = logging.getLogger(__name__)

_DEVICE_REQUESTS = ("surprisal", "pooled", "allocate", "release")
START_TIMEOUT = 300.0  # seconds for a worker to import torch and transformers and report ready


@dataclass
class _Spec:
    """What a worker needs to run the engine's host side (pickled to it once)."""

    model_class: type
    config: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    model_name: str
    engine_settings: dict[str, Any]
    started: float  # the parent's time.time() at start (the worker reports its start-up time)
    pooling: bool = False  # ITPC streams keep their KV caches in the parent's device pool


class WorkerError(RuntimeError):
    """An exception raised in a worker that could not be sent back as itself."""


class NotPortable(TypeError):
    """A call's arguments cannot be pickled to a worker (it then runs in the calling thread)."""


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a :class:`WorkerError` carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        return WorkerError("".join(traceback.format_exception(exc)))


class _RemoteQueue:
    """A worker's stand-in for the model's :class:`~.serving.ScoringQueue`: each request
    goes to the parent process, which scores it with the other workers' requests."""

    def __init__(self, conn, pooling: bool = False) -> None:
        self.conn = conn
        self.pooling = pooling  # the parent's runner keeps ITPC streams' KV caches in its pool

    def session(self):
        return contextlib.nullcontext()  # the parent holds the session for this call

    def _ask(self, kind: str, body: Any) -> Any:
        self.conn.send((kind, body))
        reply, payload = self.conn.recv()
        if reply == "error":
            raise payload
        return payload

    def surprisal(self, seqs, starts=None) -> list[torch.Tensor]:
        arrays = [np.asarray(torch.as_tensor(s, dtype=torch.long).reshape(-1)) for s in seqs]
        payload = self._ask("surprisal", (arrays, None if starts is None else [int(st) for st in starts]))
        return [torch.from_numpy(a) for a in payload]

    def allocate(self, n: int) -> int | None:
        return self._ask("allocate", int(n))

    def release(self, region: int) -> None:
        self._ask("release", int(region))

    def pooled_surprisal(self, items) -> list[torch.Tensor]:
        body = [(int(r), int(c), np.asarray(torch.as_tensor(x, dtype=torch.long).reshape(-1)), int(f))
                for r, c, x, f in items]
        return [torch.from_numpy(a) for a in self._ask("pooled", body)]


def _host_engine(spec: _Spec, conn) -> "CompressionEngine":
    """An engine whose small LM exists only as a tokenizer, a configuration and a queue
    that asks the parent process for surprisals."""
    from . import packed_attention
    from .engine import CompressionEngine
    from .models import LoadedModel
    from .scoring import CausalScorer

    if getattr(spec.config, "_attn_implementation", None) == packed_attention.NAME:
        packed_attention.register()  # the parent switched its model to it; the config names it
    with torch.device("meta"):
        model = spec.model_class(spec.config)
    loaded = LoadedModel(spec.model_name, "", model, spec.tokenizer, spec.device, spec.dtype)
    loaded._queue = _RemoteQueue(conn, spec.pooling)
    engine = CompressionEngine.__new__(CompressionEngine)
    engine._configure(spec.model_name, device=spec.device, dtype=spec.dtype, **spec.engine_settings)
    # the parent's queue path: windows rescored from scratch, every request through the queue
    engine._scorer = CausalScorer(loaded, batch_size=engine.batch_size, kv_cache=False, queue=True)
    return engine


def _worker_main(conn) -> None:
    """A worker's life: receive the spec, build the host-side engine, then run calls
    until told to stop."""
    torch.set_num_threads(1)  # host work only; the parent's CPU threads stay its own
    try:
        spec: _Spec = pickle.loads(conn.recv_bytes())
        imported = time.time() - spec.started  # the process started and its imports done
        engine = _host_engine(spec, conn)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ready", {"imported_s": imported, "ready_s": time.time() - spec.started}))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if kind == "stop":
            return
        try:
            if kind == "clear":
                engine.clear_rankings()
                conn.send(("done", None))
            else:
                args, kwargs = payload
                conn.send(("done", engine.compress(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller
            conn.send(("error", _portable(exc)))


def _start_context(model_module: str):
    """A forkserver context whose server has imported what workers need (spawn elsewhere)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # takes effect when the server starts (the first workers of this process)
    ctx.set_forkserver_preload(["torch", "transformers", model_module, __name__, "lingua_integrations.engine"])
    return ctx


class _Worker:
    def __init__(self, ctx, index: int) -> None:
        # the spec (a tokenizer: megabytes) follows over the pipe once every worker is started
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), name=f"lingua-host-{index}", daemon=True)
        self.process.start()
        child.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("stop", None))
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
        self.conn.close()


class HostWorkers:
    """Worker processes running the host side of an engine's calls (see the module doc).

    Args:
        engine: the engine whose model serves the workers' device work.
        processes: how many calls run at once (each worker runs one call at a time; more
            callers wait for a free worker).
    """

    def __init__(self, engine: "CompressionEngine", processes: int) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive integer, got {processes!r}")
        scorer = engine.scorer
        if scorer.kv_cache:
            raise ValueError(
                f"host workers serve a small LM on a GPU, whose calls spend more time in Python than on the "
                f"device; {engine.model_name!r} on {scorer.device} extends a KV cache window by window (a model "
                "over 1B parameters, or any model on the CPU), so its calls are bound by arithmetic in this "
                "process and workers would not make them faster: call engine.compress from threads instead")
        loaded = scorer.loaded
        spec = _Spec(type(loaded.model), loaded.model.config, loaded.tokenizer, loaded.device, loaded.dtype,
                     loaded.name, engine._settings(), time.time(), bool(loaded.scoring_queue().pooling))
        try:
            blob = pickle.dumps(spec)  # once, for every worker (a tokenizer: megabytes)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"host workers need this engine's settings to be picklable ({exc}): pass token_counter "
                             "as a tiktoken encoding name or a module-level function, not a lambda") from exc
        self.queue = loaded.scoring_queue()
        ctx = _start_context(type(loaded.model).__module__)
        workers = [_Worker(ctx, k) for k in range(processes)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all = list(workers)
        self._lock = threading.Lock()
        self.startup: list[dict[str, float]] = []  # diagnostics: each worker's start-up seconds
        try:
            for w in workers:
                w.conn.send_bytes(blob)  # each child reads it once its imports are done (all import at once)
            for w in workers:
                if not w.conn.poll(START_TIMEOUT):
                    raise RuntimeError(f"a host worker did not start within {START_TIMEOUT:.0f} s")
                kind, payload = w.conn.recv()
                if kind != "ready":
                    raise RuntimeError(f"a host worker failed to start: {payload}") from payload
                self.startup.append(payload)
                self._idle.put(w)
        except (EOFError, OSError) as exc:
            self.close()
            raise RuntimeError(
                "a host worker exited while starting: a script that starts workers must do so under "
                "`if __name__ == \"__main__\":` (workers are spawned processes that import the main module)") from exc
        except BaseException:
            self.close()
            raise
        # the workers' Python no longer competes for this process's interpreter lock, so as
        # many calls as there are workers may be in progress (serving.py's admission)
        self._admitted = self.queue.max_active
        self.queue.max_active = None if self._admitted is None else max(self._admitted, processes)
        self.processes = processes

    def compress(self, args: tuple, kwargs: dict[str, Any]) -> "CompressionResult":
        """Run ``engine.compress(*args, **kwargs)`` in a free worker, scoring its requests here."""
        return self._call("compress", (args, kwargs))

    def clear_rankings(self) -> None:
        """Clear every worker's ranking memo (waits for each to be free)."""
        taken = [self._take() for _ in range(len(self._all))]
        try:
            for w in taken:
                w.conn.send(("clear", None))
            for w in taken:
                w.conn.recv()
        finally:
            for w in taken:
                self._idle.put(w)

    def close(self) -> None:
        """Stop the workers (calls in progress fail); the engine then runs calls in-process."""
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.stop()
        if hasattr(self, "_admitted"):
            self.queue.max_active = self._admitted

    @property
    def alive(self) -> int:
        """Workers still in service."""
        return len(self._all)

    def _take(self) -> _Worker:
        while True:
            if not self._all:
                raise RuntimeError("no host worker is left (stopped, or all died): restart them with "
                                   "engine.stop_workers() and engine.start_workers(n)")
            with contextlib.suppress(queue.Empty):  # wake now and then: the last workers may have died
                return self._idle.get(timeout=1.0)

    def _call(self, kind: str, payload: Any) -> Any:
        while True:
            w = self._take()
            try:
                w.conn.send((kind, payload))  # pickled whole before anything is written
                break
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                self._idle.put(w)
                raise NotPortable(str(exc)) from exc
            except OSError:  # it died while idle: nothing of this call reached it, try another
                self._retire(w)
        finished = False
        regions: set[int] = set()  # pool regions this call holds (given back if it dies holding them)
        try:
            while True:
                try:
                    what, body = w.conn.recv()
                except (EOFError, OSError) as exc:
                    raise RuntimeError(f"host worker {w.process.name} died (exit code {w.process.exitcode}) "
                                       "during this call; the engine stops using it") from exc
                if what in _DEVICE_REQUESTS:
                    try:
                        reply = ("ok", self._serve_request(what, body, regions))
                    except BaseException as exc:  # noqa: BLE001 - the worker raises it in its call
                        reply = ("error", _portable(exc))
                    w.conn.send(reply)
                    continue
                finished = True
                if what == "error":
                    raise body
                return body
        finally:
            for region in regions:
                self.queue.release(region)
            if finished:
                self._idle.put(w)
            else:  # mid-conversation (died, interrupted): the worker's state is unknown
                self._retire(w)

    def _serve_request(self, what: str, body: Any, regions: set[int]) -> Any:
        """A worker's device request, answered from this process's queue and pool."""
        if what == "surprisal":
            arrays, starts = body
            return [r.numpy() for r in self.queue.surprisal([torch.from_numpy(a) for a in arrays], starts)]
        if what == "pooled":
            items = [(r, c, torch.from_numpy(x), f) for r, c, x, f in body]
            return [r.numpy() for r in self.queue.pooled_surprisal(items)]
        if what == "allocate":
            region = self.queue.allocate(body)
            if region is not None:
                regions.add(region)
            return region
        regions.discard(body)  # "release"
        self.queue.release(body)
        return None

    def _retire(self, w: _Worker) -> None:
        with self._lock:
            if w in self._all:
                self._all.remove(w)
        logger.warning("host worker %s retired; %d left", w.process.name, len(self._all))
        w.stop()
