"""Iterative token-level prompt compression (ITPC), LLMLingua's fine-grained step.

The kept text is cut into windows of ``window`` small-LM tokens. Window ``j`` is scored
*conditioned on the already compressed windows before it*: the compressed prefix stays
in the KV cache, only the current window (and its successor) are recomputed. Tokens
whose score is below the window's threshold are dropped. Conditioning on the
compressed prefix is what distinguishes ITPC from one-shot self-information pruning.

The score of a token is its surprisal, or, for LongLLMLingua, the contrastive score
(:mod:`.contrastive`) computed from two streams: the context alone and the context
after the question.

Two ways of choosing what to drop share this loop:

* ``reference=True`` reproduces ``llmlingua`` 0.2.2 (for :class:`PromptCompressor`):
  a token is judged by the surprisal of the token *after* it, the threshold is a
  quantile of the scores of the whole sequence, and a trailing window shorter than
  ``window`` is left as is.
* the default judges each token by its own score, keeps the top ``rate`` share of every
  run of the plan exactly, and compresses the last window too, so the achieved rate
  follows the asked one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .contrastive import contrastive_scores
from .kv_graphs import StaticUnavailable
from .scoring import CausalScorer


def _crop(cache, length: int):
    """Shorten a transformers cache to ``length`` tokens (``None`` when nothing is left)."""
    if cache is None or length <= 0:
        return None
    current = cache.get_seq_length()
    if length < current:
        cache.crop(length - current)  # negative: remove that many from the end
    return cache


class _Stream:
    """A sequence under compression with one score per position and its KV cache.

    ``shift`` says where a token's surprisal is stored: at its own position (1) or at the
    position before it (0, the reference's alignment).
    """

    def __init__(self, scorer: CausalScorer, ids: torch.Tensor, shift: int) -> None:
        self.scorer = scorer
        self.ids = ids
        self.v = torch.full((len(ids),), math.nan)
        self.shift = shift
        self.cache = None
        # a big model on a GPU: a static cache with captured graphs (None: the dynamic cache)
        self.static = scorer.static.acquire(len(ids)) if scorer.kv_cache else None
        self.offset = 0  # first position the model sees (long inputs slide this forward)
        self.cached = 0  # positions offset .. offset+cached-1 are in the cache
        # the first position the reference recomputes at the next step (0 after the first pass,
        # then the start of the window just judged): a drop never moves `cached` before it
        self.floor = 0
        # windows batched across callers: the KV cache in a region of the device pool (kv_pool.py);
        # a sequence longer than the model's window slides its view and is scored from scratch
        self.region = (scorer.pool_allocate(len(ids)) if self.static is None and scorer.pooled
                       and len(ids) <= (scorer.loaded.max_positions or 0) else None)

    def close(self) -> None:
        """Give the static cache back for the next call."""
        self.scorer.static.release(self.static)
        self.static = None
        if self.region is not None:
            self.scorer.pool_release(self.region)
            self.region = None

    def _score(self, view: torch.Tensor, need: int) -> tuple[int, torch.Tensor]:
        """Surprisal of ``view[first:]`` given the cached positions: ``(first, loss)``, with
        ``first`` the later of ``cached+1`` and ``need`` (positions before ``need`` go
        into the cache unscored). May reset ``cached``."""
        if self.static is not None:
            try:
                loss = self.static.surprisal(view[self.cached :], self.cached)
                first = max(self.cached + 1, need)
                return first, loss[first - self.cached - 1 :]
            except StaticUnavailable as exc:
                if exc.permanent:
                    self.scorer.static.disable()
                self.close()
                self.cache, self.cached = None, 0  # the dynamic cache starts empty
        first = max(self.cached + 1, need)
        loss, self.cache = self.scorer.surprisal(view, self.cache, self.cached, first)
        return first, loss

    def _write(self, first: int, loss: torch.Tensor) -> None:
        p = first + self.shift
        self.v[p : p + len(loss)] = loss.to("cpu", torch.float32)[: max(0, len(self.v) - p)]

    def view(self, end: int, keep: int) -> tuple[int, torch.Tensor] | None:
        """What to score so that positions up to ``end`` have scores: ``(first, ids)``,
        or None when nothing new is needed. Slides the model's view forward when the
        sequence outgrows its window."""
        end = min(end, len(self.ids))
        limit = self.scorer.loaded.max_positions
        if end - self.offset > limit:  # slide: drop the oldest half of the view
            self.offset = max(0, min(keep, end - limit // 2))
            self.cache, self.cached = None, 0
        view = self.ids[self.offset : end]
        if len(view) - self.cached < 2:
            return None
        return self.offset, view

    def launch(self, end: int, keep: int, need: int = 0) -> tuple[int, torch.Tensor] | None:
        """Start scoring positions up to ``end``, reusing the cache: only positions from
        ``cached`` on run through the model, and every position the cache then holds
        stays valid until :meth:`keep` drops a token before it (the window about to be
        judged starts at ``keep``). Scores of positions before ``need`` are not asked
        for (their old values stay). Returns what :meth:`finish` writes: on a GPU's
        static cache the scores are still on the device, so a second stream's pass can
        be queued behind this one before the host waits for either."""
        todo = self.view(end, keep)
        self.floor = keep
        if todo is None:
            return None
        _, view = todo
        first, loss = self._score(view, need - self.offset)
        self.cached = len(view)
        # a static cache needs no cropping: the next window is written from position `cached`
        return self.offset + first - 1, loss

    def finish(self, launched: tuple[int, torch.Tensor] | None) -> None:
        """Write the scores :meth:`launch` started (the host waits for them here)."""
        if launched is not None:
            self._write(*launched)

    def settle(self, keep: int) -> None:
        """Without a KV cache: positions before ``keep`` are final, the next step's scores
        start there."""
        self.cached = max(0, min(self.cached, keep - self.offset))

    def keep(self, index: torch.Tensor, first_drop: int) -> None:
        """Keep the positions ``index`` lists (ascending); ``first_drop`` is the first one
        dropped. A KV cache (pooled, static or dynamic) stays valid up to it: the tokens
        before it, their prefix and their positions are unchanged, so recomputing them
        would give the same scores (the reference recomputes the whole judged window; on a
        60-document LongLLMLingua call that doubled the window steps' positions)."""
        if self.region is not None or self.scorer.kv_cache:
            # with the reference's alignment (shift 0) the position before a drop holds the score
            # of the token after it, which is now another token: that position reruns too, unless
            # it lies before `floor`, where the reference does not rerun it and keeps the old score
            valid = max(first_drop - 1 + self.shift, self.floor) - self.offset
            self.cached = max(0, min(self.cached, valid))
            if self.cache is not None:
                self.cache = _crop(self.cache, self.cached)
                if self.cache is None:
                    self.cached = 0
        # an index, not a boolean mask: a CPU mask lookup runs its own nonzero (~0.1 ms on 6k
        # positions), and a window step selects from up to seven per-position arrays
        self.ids = self.ids.index_select(0, index)
        self.v = self.v.index_select(0, index)


def _score_from_scratch(scorer: CausalScorer, todo: list[tuple[_Stream, torch.Tensor]],
                        needs: Sequence[int] | None = None) -> None:
    """Score each stream's view afresh, all views in one batch (no KV cache). Only the
    scores a KV cache would have recomputed are asked for (tokens after ``cached``), and
    of those only from the stream's ``need`` on: the model still reads the whole view,
    but the LM head runs only there."""
    items = [(st, ids, need) for (st, ids), need in zip(todo, needs or [0] * len(todo)) if len(ids) >= 2]
    starts = [min(len(ids), max(st.cached + 1, need - st.offset)) for st, ids, need in items]
    for (st, _, _), first, loss in zip(items, starts, scorer.sequences_surprisal([ids for _, ids, _ in items], starts)):
        st._write(st.offset + first - 1, loss)


def _score_pooled(todo: list[tuple[_Stream, int, int]]) -> None:
    """Scores up to ``end`` for each ``(stream, end, need)`` whose KV cache is in the pool,
    all in one request: only the tokens after a stream's ``cached`` prefix run, and of
    those only the ones from ``need`` on through the LM head. A stream's pool then holds
    every position up to ``end`` (:meth:`_Stream.keep` moves that back past a drop)."""
    items, owners = [], []
    for st, end, need in todo:
        end = min(end, len(st.ids))
        first = max(st.cached + 1, need)
        if end - st.cached < 2 or first >= end:
            continue
        items.append((st.region, st.cached, st.ids[st.cached : end], first - st.cached))
        owners.append((st, first, end))
    if items:
        for (st, first, end), loss in zip(owners, todo[0][0].scorer.pooled_surprisal(items)):
            st._write(first - 1, loss)
            st.cached = end


def _score_first(streams: list[tuple[_Stream, int | None]]) -> None:
    """The first pass: each stream's first ``limit`` positions (all when None), in one batch."""
    todo, pooled = [], []
    for st, limit in streams:
        st.cache, st.offset, st.cached, st.floor = None, 0, 0, 0
        n = len(st.ids) if limit is None else min(limit, len(st.ids))
        if st.region is not None:
            pooled.append((st, n, 0))
        else:
            todo.append((st, st.ids[:n]))
    if pooled:
        _score_pooled(pooled)
    if todo:
        _score_from_scratch(streams[0][0].scorer, todo)


def _score_upto(streams: list[tuple[_Stream, int, int]], judged_only: bool = False) -> None:
    """Scores up to ``end`` for each ``(stream, end, keep)``, the window about to be
    judged starting at ``keep``: with a KV cache (dynamic or static, stream by stream;
    pooled, every stream in one request) only the positions after what the cache holds
    run (:meth:`_Stream.keep`); without one, every stream's whole view in one batch, and
    positions before ``keep`` are final from then on (the next step starts its scores
    there). ``judged_only``: only positions from ``keep`` on get new scores; the ones
    before it are recomputed for the cache alone."""
    scorer = streams[0][0].scorer
    if scorer.kv_cache:
        launched = [st.launch(end, keep, keep if judged_only else 0) for st, end, keep in streams]
        for (st, _, _), scores in zip(streams, launched):
            st.finish(scores)
        return
    for st, _, keep in streams:
        st.floor = keep
    pooled = [(st, end, keep if judged_only else 0) for st, end, keep in streams if st.region is not None]
    if pooled:
        _score_pooled(pooled)
    todo, needs = [], []
    for st, end, keep in streams:
        if st.region is not None:
            continue
        view = st.view(end, keep)
        if view is not None:
            todo.append((st, view[1]))
            needs.append(keep if judged_only else 0)
    if todo:
        _score_from_scratch(scorer, todo, needs)
    for st, ids in todo:
        st.cached = len(ids)
    for st, _, keep in streams:
        if st.region is None:
            st.settle(keep)


@dataclass
class ITPCResult:
    kept: torch.Tensor  # original positions kept, ascending
    scores: torch.Tensor  # score of every original position when it was judged (NaN: never judged)


def _region(n: int, piece_end: int, delta: int, start: int) -> tuple[int, int]:
    """The positions ``[lo, hi)`` a plan piece judges: those before ``piece_end`` and from
    ``piece_end - delta`` on, none before ``start``, both bounds read with Python's slice
    semantics (a negative one counts from the end), as the reference's window is."""
    hi = slice(piece_end, None).indices(n)[0]
    lo = max(slice(None, piece_end - delta).indices(n)[1], min(start, n))
    return lo, max(lo, hi)


def _quantile_threshold(values: torch.Tensor, ratio: float) -> float:
    """Score below which a token goes, so that about ``ratio`` of ``values`` stays."""
    if ratio == 1.0:
        return -math.inf
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        return -math.inf
    k = max(0, min(values.numel() - 1, int(values.numel() * ratio) - 1))
    # the (k+1)-th largest value: a selection, not a sort (29 of them in a 6.7k-token LLMLingua call)
    return float(values.kthvalue(values.numel() - k).values)


def iterative_compress(
    scorer: CausalScorer,
    ids: Sequence[int],
    plan: list[list[tuple[int, float]]],
    *,
    start: int = 0,
    contrastive: bool = False,
    reference: bool = False,
    window: int = 200,
    force_keep: torch.Tensor | None = None,
    priority: torch.Tensor | None = None,
) -> ITPCResult:
    """Compress ``ids`` window by window following ``plan``.

    ``ids[:start]`` is a conditioning prefix (the question, for LongLLMLingua) that is
    never dropped; with ``contrastive`` the scores contrast the sequence with and without
    that prefix. ``priority`` (default mode only) marks positions kept before any other
    of their window, budget permitting (names and numbers). ``force_keep`` marks positions that must survive (separators, spans the
    caller exempted).
    """
    if window < 2:
        raise ValueError("iterative_size must be at least 2 tokens")
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    n0 = len(ids_t)
    shift = 0 if reference else 1
    main = _Stream(scorer, ids_t, shift)
    try:
        plain = _Stream(scorer, ids_t[start:], shift) if contrastive else None
    except BaseException:
        main.close()  # its static cache or pool region goes back
        raise
    forced = force_keep.clone().bool() if force_keep is not None else torch.zeros(n0, dtype=torch.bool)
    preferred = priority.clone().bool() if priority is not None else torch.zeros(n0, dtype=torch.bool)

    end = min(window + start, n0) if reference else window + start
    try:
        return _compress_windows(plan, main, plain, start, window, reference, end, n0, forced, preferred)
    finally:
        main.close()
        if plain is not None:
            plain.close()


def _compress_windows(plan, main: _Stream, plain: _Stream | None, start: int, window: int, reference: bool,
                      end: int, n0: int, forced: torch.Tensor, preferred: torch.Tensor) -> ITPCResult:
    """The window loop of :func:`iterative_compress`."""
    origin = torch.arange(n0)
    judged = torch.full((n0,), math.nan)
    for idx, pieces in enumerate(plan):
        n = len(main.ids)
        if (reference and end > n) or (not reference and end - window >= n):
            break
        if idx == 0:
            # the reference's threshold needs every score up front; otherwise only the first
            # window is judged from this pass (later windows are rescored on the compressed prefix)
            _score_first([(main, None if reference else end + 1)]
                         + ([(plain, None if reference else end + 1 - start)] if plain is not None else []))
        else:
            # the default judges only the window from `end - window` on: the compressed one before
            # it is recomputed for the cache alone (the reference's thresholds read every score)
            _score_upto([(main, end, end - window)]
                        + ([(plain, end - start, end - window - start)] if plain is not None else []),
                        judged_only=not reference)
        for delta, ratio in pieces:
            n = len(main.ids)
            piece_end = end - window + delta
            lo, hi = _region(n, piece_end, delta, start)
            # the scores of the region alone (the reference's threshold reads all of them)
            if plain is not None:
                seg = contrastive_scores(plain.v[lo - start : hi - start], main.v[lo:hi])
            else:
                seg = main.v[lo:hi]
            unknown, held = torch.isnan(seg), forced[lo:hi]
            if reference:
                pool = contrastive_scores(plain.v, main.v[start:]) if plain is not None else main.v
                threshold = _quantile_threshold(pool, ratio)
                drop = ~(seg > threshold) & ~unknown & ~held
            else:
                candidates = ~unknown & ~held
                m = int(candidates.sum())
                k = m - int(round(ratio * (hi - lo))) + int((unknown | held).sum())
                drop = torch.zeros(hi - lo, dtype=torch.bool)
                if k > 0 and m:
                    cand_pos = candidates.nonzero().squeeze(1)
                    # preferred positions sort after every other candidate: dropped last
                    key = seg[cand_pos] + preferred[lo:hi][cand_pos].float() * 1e6
                    lowest = key.argsort()[: min(k, m)]
                    drop[cand_pos[lowest]] = True
            judged[origin[lo:hi]] = seg
            removed_before_end = int(drop.sum())  # every drop lies in the region, before piece_end
            if removed_before_end:
                index = torch.cat([torch.arange(lo), lo + (~drop).nonzero().squeeze(1), torch.arange(hi, n)])
                first_drop = lo + int(drop.nonzero()[0])
                main.keep(index, first_drop)
                if plain is not None:  # its positions are main's from `start` on (lo >= start)
                    plain.keep(index[start:] - start, first_drop - start)
                origin, forced, preferred = (x.index_select(0, index) for x in (origin, forced, preferred))
            end = piece_end - removed_before_end + window
    return ITPCResult(kept=origin, scores=judged)
