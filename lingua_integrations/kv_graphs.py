"""ITPC windows on a big model on a GPU: a static KV cache and one CUDA graph per window size.

ITPC extends a sequence's KV cache window by window: each step feeds the ~200-400 tokens
of the next window (plus the leftover of the previous one) through the model, given
the compressed prefix already in the cache. For a 7B model one such pass is a few
milliseconds of GPU work but tens of milliseconds of Python launching ~1,000 kernels, so
the steps are bound by the host, not the device. :class:`StaticWindows` keeps the cache
in fixed tensors (transformers' ``StaticCache``) and replays a captured CUDA graph per
window-length bucket, so a step costs one replay.

How a step maps onto the static cache:

* the cache's write position (``cumulative_length`` of every layer) is set to the number
  of tokens kept in the cache before each replay; "cropping" the cache after a window is
  just writing the next window from an earlier position;
* the window is right-padded to its bucket length; padding sits after every real token,
  so causal attention hides it from them, and the next step overwrites it;
* position ids are passed explicitly (a static buffer), so rotary positions are right
  whatever the transformers version derives from the cache;
* attention reads only the cache's first ``span`` slots (a multiple of ``SPAN_STEP``
  holding the cached prefix and the window), not all of it: a static cache is sized for
  the whole uncompressed sequence, while the compressed prefix a window attends to is a
  fraction of that, and masked slots still cost attention arithmetic. The span is part
  of a graph's key, like the window's bucket.

Anything this path cannot do (a cache API without ``cumulative_length``, a failed
capture, out of memory) raises :class:`StaticUnavailable`; the caller then falls back to
the eager, dynamic-cache path for that sequence.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from .compilation import uncompiled
from .models import cache_keyword
from .runner import capture_graph, token_surprisal

logger = logging.getLogger(__name__)

# window-length buckets: steps of 128 up to 2048 (ITPC windows are a few hundred tokens:
# little padding), then powers of two and their midpoints (the first, longer views)
_BUCKETS = sorted({128 * k for k in range(1, 17)} | {int(b * m) for b in (2 ** k for k in range(11, 16))
                                                    for m in (1.0, 1.5)})
MAX_CACHE = 16384  # longest static cache (tokens); longer sequences use the dynamic path
SPAN_STEP = 1024  # attention spans of a static cache: multiples of this (few graphs, little waste)


class StaticUnavailable(RuntimeError):
    """The static-cache path cannot serve this request; use the dynamic cache.
    ``permanent``: it will not work for any request (turn the path off)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


def _bucket(n: int) -> int:
    return next((b for b in _BUCKETS if b >= n), n)


def _limit_span(layer) -> None:
    """Make a static cache layer show attention only its first ``layer.span`` slots: the
    keys and values it returns and the mask size it reports."""
    update, sizes = layer.update, layer.get_mask_sizes

    def update_within_span(*args, **kwargs):
        keys, values = update(*args, **kwargs)
        return keys[:, :, : layer.span], values[:, :, : layer.span]

    def sizes_within_span(*args, **kwargs):
        length, offset = sizes(*args, **kwargs)
        return min(length, layer.span), offset

    layer.update, layer.get_mask_sizes, layer.span = update_within_span, sizes_within_span, layer.max_cache_len


class StaticWindows:
    """One sequence's static KV cache on one model, with a captured graph per window bucket.

    Not thread-safe on its own: one ITPC stream uses it at a time (the model's lock
    serialises device work between streams).
    """

    def __init__(self, model, lock: threading.RLock, length: int, pad_id: int, graphs: bool,
                 pool: Any = None) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model = model
        self.lock = lock
        self.length = length
        self.pad_id = pad_id
        self.graphs = graphs
        self.pool = pool
        self.device = next(model.parameters()).device
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=length)
        except Exception as exc:  # noqa: BLE001 - an unknown cache API: use the dynamic path
            raise StaticUnavailable(f"StaticCache not usable here: {exc}") from exc
        # every layer or none (the layers' spans must agree with the one mask), and only plain
        # full-attention layers: a sliding-window layer reports its own sizes
        self._spanned = all(type(layer) is StaticLayer for layer in self.cache.layers)
        if self._spanned:
            for layer in self.cache.layers:
                _limit_span(layer)
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.spans_used: set[int] = set()  # diagnostics: the attention spans replayed

    def _span(self, end: int) -> int:
        """Slots attention reads for a pass ending at ``end`` (the whole cache when the
        layers cannot be limited)."""
        if not self._spanned:
            return self.length
        return min(self.length, -(-end // SPAN_STEP) * SPAN_STEP)

    def _set_position(self, cached: int, span: int) -> None:
        for layer in self.cache.layers:
            pos = getattr(layer, "cumulative_length", None)
            if not isinstance(pos, torch.Tensor):
                raise StaticUnavailable("this transformers version's StaticCache has no cumulative_length")
            pos.fill_(cached)
            layer.span = span

    def _loss(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with uncompiled(self.model):  # whole compiled layers would specialise per layer on the cache
            logits = self.model(input_ids=ids, position_ids=positions.unsqueeze(0), use_cache=True,
                                **{cache_keyword(self.model): self.cache}).logits[0, :-1]
        return token_surprisal(logits, ids[0, 1:])

    def _graph(self, width: int, span: int, cached: int):
        hit = self._captured.get((width, span))
        if hit is not None:
            return hit
        ids = torch.full((1, width), self.pad_id, dtype=torch.long, device=self.device)
        positions = torch.arange(cached, cached + width, device=self.device)
        graph, out = capture_graph(lambda: self._loss(ids, positions), self.device, self.pool,
                                   prepare=lambda: self._set_position(cached, span))
        self._captured[(width, span)] = (graph, ids, positions, out)
        return self._captured[(width, span)]

    @torch.inference_mode()
    def surprisal(self, new_ids: torch.Tensor, cached: int) -> torch.Tensor:
        """Surprisal of ``new_ids[1:]`` given the first ``cached`` cache positions and
        ``new_ids``' own prefix; ``new_ids`` are written to positions ``cached ..``. The
        result stays on the device: the host waits only when it reads it."""
        n = len(new_ids)
        width = _bucket(n)
        if cached + width > self.length:
            raise StaticUnavailable(f"{cached + width} positions exceed the static cache's {self.length}",
                                    permanent=False)
        span = self._span(cached + width)
        self.spans_used.add(span)
        try:
            with self.lock:
                if self.graphs:
                    graph, ids, positions, out = self._graph(width, span, cached)
                    ids[0, :n].copy_(new_ids, non_blocking=True)
                    ids[0, n:].fill_(self.pad_id)
                    torch.arange(cached, cached + width, out=positions)
                    self._set_position(cached, span)
                    graph.replay()
                    # left on the device (no host sync), so the caller can queue another stream's
                    # pass before reading it; a copy, since graphs share one memory pool and a
                    # graph captured earlier may use `out`'s memory for its own intermediates
                    return out[: n - 1].clone()
                ids = torch.full((1, width), self.pad_id, dtype=torch.long)
                ids[0, :n] = new_ids
                self._set_position(cached, span)
                positions = torch.arange(cached, cached + width, device=self.device)
                return self._loss(ids.to(self.device), positions)[: n - 1]
        except StaticUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - capture failure, out of memory: the dynamic path takes over
            logger.warning("static KV cache path failed (%s); using the dynamic cache", exc)
            self._captured.clear()
            raise StaticUnavailable(str(exc)) from exc


class StaticPool:
    """Static caches of one model, reused across calls (allocating gigabytes per call would
    cost more than the steps). ``acquire`` returns None when the path is off or unusable."""

    def __init__(self, model, lock: threading.RLock, max_positions: int, pad_id: int, enabled: bool,
                 keep: int = 4) -> None:
        self.model = model
        self.lock = lock
        self.limit = min(MAX_CACHE, 2 * max_positions)
        self.pad_id = pad_id
        self.enabled = enabled
        self.keep = keep
        self._free: dict[int, list[StaticWindows]] = {}  # by cache length
        self._mutex = threading.Lock()
        self._graphs = next(model.parameters()).device.type == "cuda"  # eager elsewhere (CPU: tests)
        self._graph_pool = None

    def acquire(self, tokens: int) -> StaticWindows | None:
        """A static cache for a sequence of ``tokens`` tokens, or None (use the dynamic path).

        Its length is the power of two holding the sequence plus one long window (few
        distinct lengths to pool; attention reads only the span a window needs)."""
        length = 1 << (tokens + 1024 - 1).bit_length()
        if not self.enabled or length > self.limit:
            return None
        with self._mutex:
            free = self._free.get(length)
            if free:  # first in, first out: a call's streams get the caches (and graphs) they had last time
                return free.pop(0)
        try:
            if self._graphs and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            return StaticWindows(self.model, self.lock, length, self.pad_id, self._graphs, self._graph_pool)
        except StaticUnavailable as exc:
            logger.warning("%s; ITPC uses the dynamic KV cache", exc)
            self.enabled = False
            return None
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for another cache
            logger.warning("no static KV cache (%s); this sequence uses the dynamic cache", exc)
            return None

    def release(self, windows: StaticWindows | None) -> None:
        if windows is None or not self.enabled:
            return
        with self._mutex:
            free = self._free.setdefault(windows.length, [])
            if len(free) < self.keep:
                free.append(windows)

    def disable(self) -> None:
        self.enabled = False
        with self._mutex:
            self._free.clear()
