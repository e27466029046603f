"""Device execution of the one computation the causal-LM methods need: per-token surprisal
of a right-padded batch of token sequences.

On a GPU a small LM's forward pass is bound by kernel launches, not arithmetic: the
SmolLM2-135M shape takes ~22 ms per eager forward whether it sees 2k or 7k tokens.
:class:`SurprisalRunner` therefore replays a **CUDA graph** per (batch, length) bucket:
the first batch of a bucket captures the forward pass plus the loss, later ones copy
their token ids into the captured input and replay it in ~1/10 of the time.

Right padding needs no attention mask: attention is causal, so a real token never sees
the padding after it, and the padded positions' losses are discarded. That keeps the
captured computation free of data-dependent control flow.

Sequences are sorted by length and cut into batches under a token budget, so padding
stays small and memory stays bounded (on a CPU, where every padded position costs
arithmetic and batching gains only ~15% per token, a batch also ends before its padding
passes 10% of it; on a GPU fewer, fuller passes win even for a 7B model); a CUDA
out-of-memory error halves the batch and retries, down to a single sequence, before the
error reaches the caller.

**Packing.** Retrieved passages differ in length (the first 60 NQ dev passages: 24 to
334 SmolLM2 tokens), so a right-padded batch of them is mostly padding (60 passages plus
a question: 12.8k padded positions for 7.6k tokens; in the small model's bucketed graph
shapes, 24.6k). On a GPU, sequences are instead packed, best fit by decreasing length,
into rows as wide as their length class (:meth:`SurprisalRunner._row_width`), each
restarting its position ids: transformers then masks attention block by block (a token
sees only its own sequence), so the arithmetic follows the real tokens; a graph's static
inputs are then the ids and the position ids. A call's passes are launched one after
another and waited for at the end, so laying out the next pass (vectorised: a 64-caller
round packs ~1300 sequences) overlaps the device's work on this one. A one-off probe
checks that the model honours packed position ids (same surprisals packed as alone)
before packing is used. On a CPU, where batches are already cut at 10% padding, packing
measured no faster (20 passages: 4.5-4.8 s either way), so it stays off there.

**The LM head only where a score is asked for.** A packed pass computes the LM head (a
fifth of a 135M model's arithmetic) and the log-softmax over the vocabulary only at the
positions its sequences score: ranking asks for the question's ~20 tokens after each
document, an ITPC window step for the window it judges (the drop-in: the whole tail its KV
cache would have recomputed). The
decoder's hidden states are gathered at those positions (a flat index, an input of the
captured graph, its length bucketed to an eighth, a quarter or half of the pass) before
the head. A one-off probe checks that the model's own forward gives the same
surprisals (a model that post-processes its logits would not), else the head runs
everywhere.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
import threading
from typing import Callable, Sequence

import numpy as np
import torch

from . import packed_attention
from . import kv_pool
from .kv_pool import KVPool, PooledPass
from .compilation import compile_available, compile_regions, compiled, no_recompiling, uncompiled

logger = logging.getLogger(__name__)

MIN_WINDOW = 128  # the shortest window a sequence is cut into under memory pressure
PACK_WIDTH = 512  # the narrowest packed row (see SurprisalRunner._row_width)
# with variable-length attention on, the sequences a packed row holds at most (its padding is one
# more): a captured graph's list of sequence boundaries has a fixed size, rows x (this + 1) + 1
SEQS_PER_ROW = 15
POOLED_SEQS = 256  # most streams one pooled pass serves (its boundary lists are bucketed up to this)
# bucket edges for sequence lengths: powers of two and the midpoints between them
_LENGTHS = sorted({int(b * m) for b in (2 ** k for k in range(5, 18)) for m in (1.0, 1.5)})


@functools.lru_cache(maxsize=None)
def _length_edges(max_positions: int | None) -> tuple[int, ...]:
    """:data:`_LENGTHS` up to a model's window, and the window itself (asked for per
    sequence when packing, so computed once per window size)."""
    edges = [e for e in _LENGTHS if not max_positions or e <= max_positions]
    return tuple(edges + ([max_positions] if max_positions else []))


def _bucket(n: int, edges: Sequence[int]) -> int:
    for e in edges:
        if e >= n:
            return e
    return n


def token_surprisal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log p(label)`` at each position of ``(..., positions, vocabulary)`` logits, in float32.

    Cross-entropy reduced along the contiguous vocabulary axis: ``F.cross_entropy`` wants a
    (batch, vocabulary, position) layout, ~10x slower on GPUs."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def capture_graph(fn, device: torch.device, pool=None, prepare=None):
    """``fn()`` captured as a CUDA graph: ``(graph, fn's output)``, the output living on in
    the graph's memory. ``fn`` first runs once on a side stream (lazy initialisation must
    not happen during capture); ``prepare()``, when given, runs before that warm-up and
    again before the capture, outside both. Shared by every runner that replays graphs."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        if prepare is not None:
            prepare()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if prepare is not None:
        prepare()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class SurprisalRunner:
    """Per-token surprisal of many sequences on one model (thread-safe through ``lock``).

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``logits``.
        lock: serialises forward passes on the model (shared with other users of it).
        max_tokens: padded tokens per forward pass (bounds the logits' memory).
        max_padding: largest share of padding in a batch (default: 0.1 on a CPU; none on a
            GPU, where each extra pass re-reads the weights: on the 7B shape a 10% cap made
            LLMLingua's 60-document call 0.81 s instead of 0.72 s).
        graphs: ``"auto"`` (CUDA graphs on CUDA devices), ``True`` or ``False``.
        pad_id: the id written into padding positions.
        pack: ``"auto"``: pack several sequences per row (see the module doc) on a GPU;
            ``True``/``False`` force it on or off (CPU tests).
        compile: which parts of the model to compile (:mod:`.compilation`): ``"layers"``
            (``True``), whole decoder layers, for models whose passes are captured in
            graphs (small models on a GPU); ``"cache-free"``, each layer's norms and MLP,
            for models whose ITPC windows extend a KV cache (big models on a GPU);
            ``False``: nothing. ``"auto"``: ``"layers"`` where graphs are on and
            ``"cache-free"`` on other CUDA devices, where Triton is there; nothing
            elsewhere (a CPU needs a C++ compiler and ~30 s to compile). A compilation
            error turns it off and the pass runs uncompiled.
        varlen: packed rows' attention through the variable-length flash kernel
            (:mod:`.packed_attention`): ``"auto"`` (the default) where it runs (CUDA,
            half precision; on an H100 the same outputs as SDPA's block mask inside
            captured graphs and compiled layers, 64 callers with 16 workers 1.34 -> 1.01 s),
            ``True`` everywhere (on a CPU its slow exact stand-in: tests of the layout),
            ``False``: SDPA over the packed rows' block mask.
        pool_kv: whether ITPC streams may keep their keys and values on the device between
            window steps (:mod:`.kv_pool`; needs the variable-length attention). ``"auto"``
            (the default): on CUDA devices (H100, SmolLM2 shape, 64 callers with 16 workers
            0.92 -> 0.75 s; a lone short call is rescored from scratch, see
            :data:`.serving.POOL_ALONE_MIN`); ``True`` on a CPU too (tests, with the exact
            stand-in); ``False``: windows rescored from scratch. A runner's ``pool_kv`` may be
            set before its first pooled call (the probe runs then).
        pool_tokens: token slots of that pool (default: an eighth of the free GPU memory).
    """

    def __init__(self, model, lock: threading.RLock, *, max_tokens: int = 16384, max_rows: int = 64,
                 graphs: bool | str = "auto", pad_id: int = 0, max_positions: int | None = None,
                 max_padding: float | None | str = "auto", pack: bool | str = "auto",
                 compile: bool | str = "auto", varlen: bool | str = "auto", pool_kv: bool | str = "auto",
                 pool_tokens: int | None = None) -> None:
        self.model = model
        self.lock = lock
        self.device = next(model.parameters()).device
        self.max_tokens = max(1, int(max_tokens))
        self.max_rows = max(1, int(max_rows))
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.graphs = (self.device.type == "cuda") if graphs == "auto" else bool(graphs) and self.device.type == "cuda"
        self.max_padding = (0.1 if self.device.type == "cpu" else None) if max_padding == "auto" else max_padding
        # (rows, width, packed) -> (graph, static ids, static position ids or None, loss)
        self._captured: dict[tuple[int, int, bool], tuple] = {}
        self._pool = None
        self._keep_logits = True  # the model takes logits_to_keep (transformers' causal LMs do)
        self.pack = pack
        # installed before anything is compiled or captured: both bake the attention function in
        self.varlen = bool(varlen) and packed_attention.install(model, force=varlen is True)
        # ITPC streams' keys and values kept on the device between window steps (kv_pool.py)
        self.pool_kv = (self.device.type == "cuda") if pool_kv == "auto" else bool(pool_kv)
        self.pool_tokens = pool_tokens
        self._kv_pool: KVPool | None = None
        self._pooled_graphs = True
        self._pool_compiled = True  # pooled passes through the compiled layers (off after a failure)
        self._pool_ok: bool | None = None  # probe result (None: not probed yet)
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)  # transformers: no mask to build
        if compile == "auto":
            compile = compile_available(self.device) and ("layers" if self.graphs else "cache-free")
        elif compile is True:
            compile = "layers"
        elif compile not in (False, "layers", "cache-free"):
            raise ValueError(f"compile must be 'auto', 'layers', 'cache-free', True or False, not {compile!r}")
        self.compile: str | bool = compile
        self._uncompile: Callable[[], None] | None = None  # undoes compile_regions (None: not compiled)
        self._pack_ok: bool | None = None  # probe result (None: not probed yet)
        self._gather_ok: bool | None = None  # probe result for the gathered LM head (None: not probed yet)
        self.forward_passes = 0  # diagnostics: device passes run
        self.positions_run = 0  # diagnostics: token positions those passes computed, padding included
        self.head_positions = 0  # diagnostics: positions the LM head ran at
        self.tokens_run = 0  # diagnostics: real tokens in those passes (positions_run less padding)
        self.oom_events = 0  # diagnostics: out-of-memory errors recovered from

    @property
    def captured_shapes(self) -> int:
        """Diagnostics: how many (rows, width) shapes have a captured graph."""
        return len(self._captured)

    # -- the computation --------------------------------------------------------
    def _loss(self, ids: torch.Tensor, keep: int | torch.Tensor = 0, positions: torch.Tensor | None = None,
              flat: torch.Tensor | None = None, cu: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`_pass`, through the compiled model when compilation is on. A pass that
        fails compiled is rerun eagerly: if that works, compilation was at fault (no
        compiler, an unsupported model) and is turned off; if not, the model's own error
        goes to the caller and compilation stays on."""
        if not self.compile:
            return self._pass(ids, keep, positions, token_surprisal, flat, cu)
        with self.lock:
            first = self._uncompile is None
            if first:
                self._uncompile = compile_regions(self.model, self.compile)
        try:
            if first and self.compile == "cache-free":
                self._warm_single_rows()
            return self._pass(ids, keep, positions, compiled(token_surprisal), flat, cu)
        except Exception as exc:  # noqa: BLE001 - sorted out by the eager rerun
            if _is_oom(exc):
                raise
            with uncompiled():
                result = self._pass(ids, keep, positions, token_surprisal, flat, cu)
            logger.warning("torch.compile failed (%s); running the model uncompiled", exc)
            self._stop_compiling()
            return result

    def _warm_single_rows(self) -> None:
        """Compile the one-row variant now (dynamo specialises a dimension of size 1): the
        KV-cache windows, which run one row outside this runner and cannot fall back from
        a compilation error, then find it compiled; an error shows here, where the runner
        turns compilation off."""
        self._pass(torch.full((1, 16), self.pad_id, dtype=torch.long, device=self.device), 1, None, token_surprisal)

    def _stop_compiling(self) -> None:
        with self.lock:
            self.compile = False
            if self._uncompile is not None:
                self._uncompile()

    def _pass(self, ids: torch.Tensor, keep: int | torch.Tensor, positions: torch.Tensor | None,
              surprisal: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              flat: torch.Tensor | None = None, cu: torch.Tensor | None = None) -> torch.Tensor:
        """Surprisal of the next token at each logit column of ``ids``: columns ``width -
        keep .. width - 2`` for an int ``keep`` (all when 0), the listed columns for a tensor.
        A ``keep`` skips the LM head (a fifth of a small LM's arithmetic) and the
        log-softmax over the vocabulary elsewhere. ``positions``: packed rows' position ids.
        ``flat``: instead, a 1-D result at these indices into the flattened ``(rows, width)``
        positions (each row's last column excluded), the head applied there alone.
        ``cu``: the packed sequences' flat boundaries, for variable-length attention."""
        kwargs: dict = {"use_cache": False}
        if positions is not None:
            kwargs["position_ids"] = positions
        if cu is not None:
            width = ids.shape[1]
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=width, max_length_k=width)
        if flat is not None:
            return self._head_at(self.model.get_decoder()(input_ids=ids, **kwargs).last_hidden_state, ids, flat,
                                 surprisal)
        logits = None
        if self._keep_logits and (isinstance(keep, torch.Tensor) or keep):
            try:
                logits = self.model(input_ids=ids, logits_to_keep=keep, **kwargs).logits
            except TypeError:  # a remote-code model without transformers' logits_to_keep
                self._keep_logits = False
        if logits is None:
            logits, keep = self.model(input_ids=ids, **kwargs).logits, 0
        if isinstance(keep, torch.Tensor):
            return surprisal(logits, ids[:, keep + 1])
        logits = logits[:, :-1]
        return surprisal(logits, ids[:, ids.shape[1] - logits.shape[1]:])

    def _head_at(self, hidden: torch.Tensor, ids: torch.Tensor, flat: torch.Tensor,
                 surprisal: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The LM head and surprisal at ``flat`` (indices into the flattened positions of
        ``ids``) alone, each position's label the token after it."""
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
        return surprisal(self.model.get_output_embeddings()(picked), ids.reshape(-1).index_select(0, flat + 1))

    def _graph(self, shape: tuple[int, int], packed: bool = False, head: int = 0):
        """The captured graph of ``shape`` (captured on first use; None when capture fails):
        ``(graph, ids, positions or None, flat index or None, sequence boundaries or None,
        loss)``, the inputs static. ``head``: the LM head at this many gathered positions (0: everywhere)."""
        key = (*shape, packed, head)
        hit = self._captured.get(key)
        if hit is not None or not self.graphs:
            return hit
        static = torch.full(shape, self.pad_id, dtype=torch.long, device=self.device)
        positions = torch.arange(shape[1], device=self.device).expand(shape).contiguous() if packed else None
        flat = torch.zeros(head, dtype=torch.long, device=self.device) if head else None
        cu = None
        if packed and self.varlen:  # a fixed-size boundary list: one sequence per row, then empty ones
            cu = torch.full((shape[0] * (SEQS_PER_ROW + 1) + 1,), shape[0] * shape[1], dtype=torch.int32)
            cu[: shape[0]] = torch.arange(shape[0], dtype=torch.int32) * shape[1]
            cu = cu.to(self.device)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            if self.compile:  # compile this shape before the capture: compiling while capturing fails
                # and with a position reset in each row: while capturing, transformers cannot look at
                # the position ids, so it always builds a (packed-sequence) mask; eagerly (the capture's
                # warm-up) it skips the mask unless some row packs two sequences. Compile both variants.
                warm = torch.arange(shape[1], device=self.device).repeat(shape[0], 1)
                warm[:, shape[1] // 2 :] -= shape[1] // 2
                self._loss(static, positions=positions, flat=flat, cu=cu)
                self._loss(static, positions=warm, flat=flat, cu=cu)
                torch.cuda.synchronize(self.device)
            with no_recompiling() if self.compile else contextlib.nullcontext():
                graph, out = capture_graph(lambda: self._loss(static, positions=positions, flat=flat, cu=cu),
                                           self.device, self._pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            if _is_oom(exc):
                raise
            if self.compile:  # the compiled model would not capture: capture it uncompiled
                logger.warning("CUDA graph capture of the compiled model failed (%s); running it uncompiled", exc)
                self._stop_compiling()
                return self._graph(shape, packed, head)
            if head:  # the full head's graph may still capture
                logger.warning("CUDA graph capture of the gathered LM head failed (%s); computing it everywhere", exc)
                self._gather_ok = False
                return None
            if packed:  # e.g. a transformers version whose packed-mask code syncs: padded graphs still work
                logger.warning("CUDA graph capture of packed rows failed (%s); padding batches instead", exc)
                self._pack_ok = False
                return None
            logger.warning("CUDA graph capture failed (%s); running eagerly", exc)
            self.graphs = False
            return None
        self._captured[key] = (graph, static, positions, flat, cu, out)
        return self._captured[key]

    def _shape(self, rows: int, width: int) -> tuple[int, int]:
        """The padded shape a batch runs in: bucketed when graphs are on (few captures)."""
        if not self.graphs:
            return rows, width
        return 1 << (rows - 1).bit_length(), _bucket(width, self._edges())

    def _edges(self) -> tuple[int, ...]:
        """Bucket edges of sequence lengths (up to the model's window)."""
        return _length_edges(self.max_positions)

    def _run_batch(self, seqs: Sequence[torch.Tensor], starts: Sequence[int]) -> list[torch.Tensor]:
        rows, width = self._shape(len(seqs), max(len(s) for s in seqs))
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
        with self.lock:
            captured = self._graph((rows, width)) if self.graphs else None
            if captured is not None:
                graph, static, _, _, _, out = captured
                static.copy_(ids, non_blocking=True)
                graph.replay()
                loss = out.to("cpu", copy=True)
            else:  # eager: the LM head only from the first position any row scores
                loss = self._loss(ids.to(self.device), width - min(starts) + 1).to("cpu")
            self.forward_passes += 1
            self.positions_run += rows * width
            self.tokens_run += sum(len(s) for s in seqs)
            self.head_positions += rows * loss.shape[1]
        first = width - loss.shape[1]  # the token the loss matrix starts at
        return [loss[r, st - first : len(s) - first] for r, (s, st) in enumerate(zip(seqs, starts))]

    # -- packing ------------------------------------------------------------------
    def _packing(self) -> bool:
        """Whether this call packs sequences into rows (probing the model on first use)."""
        wanted = self.device.type == "cuda" if self.pack == "auto" else bool(self.pack)
        if not wanted:
            return False
        if self._pack_ok is None:
            self._pack_ok = self._probe_packing()
        return self._pack_ok

    def _agrees(self, got: torch.Tensor, want: torch.Tensor) -> bool:
        """Whether a probe's two ways of computing the same surprisals agree, to the
        rounding of the model's dtype."""
        half = next(self.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        tol = 2e-2 if half else 1e-3
        return torch.allclose(got, want, atol=tol, rtol=tol)

    def _probe_packing(self) -> bool:
        """Do two sequences packed in one row get the surprisals they get alone? (A model
        that ignores position-id resets would let the second attend to the first.)"""
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 1000)
        a = torch.arange(11, 11 + 9) % vocab
        b = torch.arange(301, 301 + 7) % vocab
        try:
            alone = [self._loss(x.unsqueeze(0).to(self.device))[0].cpu() for x in (a, b)]
            packed = self._run_packed([[(0, a, 1), (1, b, 1)]], eager=True)
        except Exception as exc:  # noqa: BLE001 - any failure: no packing
            logger.info("packed sequences not usable with this model (%s); padding batches instead", exc)
            return False
        ok = all(self._agrees(x, y) for x, y in zip(alone, (packed[0], packed[1])))
        if not ok:
            logger.info("this model does not honour packed position ids; padding batches instead")
        return ok

    def _gathering(self) -> bool:
        """Whether packed passes may compute the LM head at gathered positions only
        (probing the model on first use)."""
        if self._gather_ok is None:
            self._gather_ok = self._probe_gather()
        return self._gather_ok

    def _probe_gather(self) -> bool:
        """Does the decoder's hidden state through the output embeddings give the model's
        own surprisals? (A model that scales or caps its logits, or hides its decoder,
        would not.)"""
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 1000)
        ids = ((torch.arange(24) * 7 + 11) % vocab).reshape(2, 12).to(self.device)
        rows, cols = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([3, 4, 5, 7, 8])
        try:
            with self.lock:
                want = self._loss(ids)[rows, cols].float().cpu()
                got = self._loss(ids, flat=(rows * 12 + cols).to(self.device)).float().cpu()
        except Exception as exc:  # noqa: BLE001 - any failure: the head runs everywhere
            logger.info("gathered LM head not usable with this model (%s); computing it at every position", exc)
            return False
        ok = got.shape == want.shape and self._agrees(got, want)
        if not ok:
            logger.info("this model's logits are not its output embeddings of the decoder's states; "
                        "computing the LM head at every position")
        return ok

    def _head_size(self, needed: int, shape: tuple[int, int]) -> int:
        """How many gathered positions a captured graph of ``shape`` computes the head at for
        ``needed`` of them: an eighth, a quarter or half of the pass (few graphs per shape),
        0 (everywhere) when more are needed."""
        total = shape[0] * shape[1]
        for part in (8, 4, 2):
            if needed <= total // part:
                return total // part
        return 0

    def _layout(self, rows: list[list[tuple[int, torch.Tensor, int]]], shape: tuple[int, int]):
        """The host side of a packed pass, vectorised (a 64-caller round packs ~1300
        sequences): token ids and position ids of ``shape``, where each sequence landed
        (``(key, row, first logit column, end column)``), the flat indices of the
        positions whose surprisal is asked for, sequence after sequence, and, with
        variable-length attention on, the flat boundaries of the sequences (each row's
        padding one of them; None otherwise)."""
        width = shape[1]
        seqs = [seq for row in rows for _, seq, _ in row]
        lens = np.array([seq.shape[0] for seq in seqs], dtype=np.int64)
        firsts = np.array([start for row in rows for _, _, start in row], dtype=np.int64)
        counts = np.array([len(row) for row in rows], dtype=np.int64)
        row_of = np.repeat(np.arange(len(rows)), counts)
        begin = np.cumsum(lens) - lens  # where each sequence starts in the concatenation
        row_begin = begin[np.cumsum(counts) - counts]
        col = begin - row_begin[row_of]
        fill = np.bincount(row_of, weights=lens, minlength=shape[0]).astype(np.int64)
        within = np.arange(int(lens.sum())) - np.repeat(begin, lens)  # each token's position id
        dest = np.repeat(row_of * width + col, lens) + within
        ids = np.full(shape[0] * width, self.pad_id, dtype=np.int64)
        ids[dest] = torch.cat(seqs).numpy()
        pos = (np.arange(width)[None, :] - fill[:, None]).reshape(-1)  # padding: a sequence of its own
        pos[dest] = within
        scored = (within >= np.repeat(firsts, lens) - 1) & (within < np.repeat(lens, lens) - 1)
        flat = dest[scored]
        placed = [(key, int(r), int(c) + start - 1, int(c) + len(seq) - 1)
                  for (key, seq, start), r, c in zip((x for row in rows for x in row), row_of, col)]
        bounds = None
        if self.varlen:
            padded = np.nonzero(fill < width)[0]
            bounds = torch.from_numpy(np.sort(np.concatenate(
                [row_of * width + col, padded * width + fill[padded], [shape[0] * width]])).astype(np.int32))
        return (torch.from_numpy(ids).view(shape), torch.from_numpy(pos).view(shape), placed,
                torch.from_numpy(flat), bounds)

    def _run_packed(self, rows: list[list[tuple[int, torch.Tensor, int]]], eager: bool = False) -> dict[int, torch.Tensor]:
        """One pass over ``rows`` (see :meth:`_launch_packed`), waited for."""
        return self._collect_packed(self._launch_packed(rows, eager))

    def _launch_packed(self, rows: list[list[tuple[int, torch.Tensor, int]]], eager: bool = False):
        """Start one pass over ``rows``, each a list of ``(key, ids, start)`` laid end to
        end, for the surprisals of tokens ``start .. len-1`` of each. On a GPU the pass runs
        while the caller lays out the next (:meth:`_collect_packed` waits for it). Replays a
        captured graph of the bucketed shape when graphs are on. The LM head runs only at
        the positions some sequence scores (see the module doc), or where the model does
        not allow that, everywhere in a graph and eagerly on the columns some row scores."""
        graphs = self.graphs and not eager
        shape = (len(rows), max(sum(ids.shape[0] for _, ids, _ in row) for row in rows))
        if graphs:
            shape = self._shape(*shape)
        width = shape[1]
        ids, pos, placed, flat, bounds = self._layout(rows, shape)
        gather = not eager and self._gathering()
        with self.lock:
            head = self._head_size(len(flat), shape) if gather and graphs else 0
            captured = self._graph(shape, packed=True, head=head) if graphs else None
            # eager passes take the exact boundary list; a graph its own, filled in below
            cu = bounds.to(self.device) if self.varlen and captured is None else None
            if captured is not None:
                graph, static, positions, index, cu, out = captured
                static.copy_(ids, non_blocking=True)
                positions.copy_(pos, non_blocking=True)
                if cu is not None:  # the list's fixed size: empty sequences at its end
                    cu.copy_(torch.cat([bounds, bounds[-1:].expand(cu.shape[0] - len(bounds))]), non_blocking=True)
                if index is not None:
                    index.copy_(torch.cat([flat, torch.zeros(head - len(flat), dtype=torch.long)]), non_blocking=True)
                graph.replay()
                loss = out.clone()  # the next replay of this graph overwrites `out`
                self.head_positions += head or shape[0] * (width - 1)
            elif gather and self._gather_ok:  # a capture may have just failed and turned it off
                loss = self._loss(ids.to(self.device), positions=pos.to(self.device), flat=flat.to(self.device),
                                  cu=cu)
                self.head_positions += len(flat)
            else:
                needed = torch.zeros(width - 1, dtype=torch.bool)  # logit columns some sequence scores from
                for _, _, a, b in placed:
                    needed[a:b] = True
                cols = needed.nonzero().squeeze(1)
                if self._keep_logits and len(cols) < 0.8 * (width - 1):
                    scored = self._loss(ids.to(self.device), cols.to(self.device), pos.to(self.device), cu=cu).to("cpu")
                    loss = torch.full((shape[0], width - 1), math.nan)
                    # a model that refused a tensor logits_to_keep returned every column
                    loss[:, cols] = scored if scored.shape[1] == len(cols) else scored[:, cols]
                    self.head_positions += shape[0] * scored.shape[1]
                else:
                    loss = self._loss(ids.to(self.device), positions=pos.to(self.device), cu=cu)
                    self.head_positions += shape[0] * (width - 1)
            self.forward_passes += 1
            self.positions_run += shape[0] * width
            self.tokens_run += sum(seq.shape[0] for row in rows for _, seq, _ in row)
        return loss, placed, len(flat)

    @staticmethod
    def _collect_packed(launched) -> dict[int, torch.Tensor]:
        """Each key's surprisals from a :meth:`_launch_packed` pass (waits for the device)."""
        loss, placed, scored = launched
        loss = loss.to("cpu")
        if loss.dim() == 1:  # gathered: the spans one after another
            sizes = [b - a for _, _, a, b in placed]
            return {key: part for (key, _, _, _), part in zip(placed, loss[:scored].split(sizes))}
        return {key: loss[r, a:b] for key, r, a, b in placed}

    def _row_width(self, n: int) -> int:
        """How wide the packed rows holding a sequence of ``n`` tokens are: its length
        bucket, at least ``PACK_WIDTH``. Rows stay near their sequences' size because
        attention over a packed row costs its width squared, masked blocks included (a
        150-token passage in a 2048-wide row paid ~half as much again for attention as for
        everything else); the floor lets short sequences share rows."""
        edges = self._edges()
        return min(_bucket(max(n, PACK_WIDTH), edges), max(n, edges[-1]))

    def _launch_surprisal_packed(self, tensors: list[torch.Tensor], lengths: list[int], firsts: list[int],
                                 order: list[int], max_rows: int) -> Callable[[], dict[int, torch.Tensor]]:
        """Start scoring ``order`` (indices into ``tensors``) in packed rows: best fit by
        decreasing length into rows of each sequence's width class (:meth:`_row_width`),
        rows into passes under the token budget. Returns a function that waits for the
        passes and gives each index's surprisals. A pass that runs out of memory falls
        back to padded batches (run before this returns)."""
        classes: dict[int, list[int]] = {}  # row width -> its sequences, longest first
        for i in sorted(order, key=lambda i: -lengths[i]):
            classes.setdefault(self._row_width(lengths[i]), []).append(i)
        passes = []
        for width, members in classes.items():
            rows: list[list[int]] = []
            rooms: list[tuple[int, int]] = []  # (room left, row), sorted: best fit by bisection
            for i in members:
                n = lengths[i]
                k = bisect.bisect_left(rooms, (n, -1))
                if k == len(rooms):
                    rows.append([i])
                    bisect.insort(rooms, (width - n, len(rows) - 1))
                else:
                    left, r = rooms.pop(k)
                    rows[r].append(i)
                    if not self.varlen or len(rows[r]) < SEQS_PER_ROW:  # a full row takes no more
                        bisect.insort(rooms, (left - n, r))
            passes += self._passes(rows, max(1, min(max_rows, self.max_tokens // width)))
        out: dict[int, torch.Tensor] = {}
        launched = []  # passes run on the device while the next is laid out; collected at the end
        for group in passes:
            try:
                launched.append(self._launch_packed([[(i, tensors[i], firsts[i]) for i in row] for row in group]))
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                self.oom_events += 1
                torch.cuda.empty_cache()
                flat = [i for row in group for i in row]
                out.update(zip(flat, self._run_split([tensors[i] for i in flat], [firsts[i] for i in flat])))

        def wait() -> dict[int, torch.Tensor]:
            for item in launched:
                out.update(self._collect_packed(item))
            return out
        return wait

    def _passes(self, rows: list[list[int]], per_pass: int) -> list[list[list[int]]]:
        """Rows cut into passes of at most ``per_pass``. With graphs a pass's rows are
        bucketed to a power of two, and padding rows cost as much as real ones (a 42-row
        pass ran as 64): full passes take a power of two, and a last pass that would be
        more than an eighth padding runs its largest power of two first."""
        if not self.graphs:
            return [rows[p : p + per_pass] for p in range(0, len(rows), per_pass)]
        per_pass = 1 << (per_pass.bit_length() - 1)
        passes, p = [], 0
        while p < len(rows):
            take = min(per_pass, len(rows) - p)
            padded = 1 << (take - 1).bit_length()
            if (padded - take) * 8 > padded:
                take = 1 << (take.bit_length() - 1)
            passes.append(rows[p : p + take])
            p += take
        return passes

    def _run_split(self, seqs: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
        """Run a batch; on CUDA out-of-memory halve it and retry, and score a single
        sequence that still does not fit as two windows overlapping by one token (as
        sequences longer than the model's window are scored), down to ``MIN_WINDOW``."""
        try:
            return self._run_batch(seqs, starts)
        except Exception as exc:  # noqa: BLE001
            if not _is_oom(exc):
                raise
            self.oom_events += 1
            if self.graphs:  # captured graphs pin memory per shape: memory is tight, run eagerly from now on
                logger.warning("out of GPU memory: releasing captured CUDA graphs and running eagerly")
                self.graphs = False
                self._captured.clear()
                self._pool = None
            torch.cuda.empty_cache()
            if len(seqs) > 1:
                logger.warning("out of GPU memory on a batch of %d sequences; splitting it", len(seqs))
                half = len(seqs) // 2
                return self._run_split(seqs[:half], starts[:half]) + self._run_split(seqs[half:], starts[half:])
            ids = seqs[0]
            if len(ids) < 2 * MIN_WINDOW:
                raise MemoryError(
                    f"GPU memory cannot hold even {len(ids)} tokens of this model: free GPU memory (other "
                    "processes, other models), use a smaller model or dtype, or run on the CPU") from exc
            logger.warning("out of GPU memory on one sequence of %d tokens; scoring it in two windows", len(ids))
            h = len(ids) // 2
            whole = torch.cat(self._run_split([ids[: h + 1]], [1]) + self._run_split([ids[h:]], [1]))
            return [whole[starts[0] - 1 :]]

    # -- the pooled KV cache (see kv_pool.py) ------------------------------------------
    @property
    def pooling(self) -> bool:
        """Whether ITPC streams may keep their keys and values in this runner's
        :class:`~.kv_pool.KVPool` (variable-length attention installed, the gathered LM
        head usable: probed on first use)."""
        if not self.pool_kv or not self.varlen or not self._gathering():
            return False
        if self._pool_ok is None:
            self._pool_ok = self._probe_pool()
        return self._pool_ok

    def _probe_pool(self) -> bool:
        """Do two pooled steps (the second's queries attending to the first's keys in the
        pool, beside another stream) give the surprisals of the whole sequence? A kernel
        that aligned its causal mask at the start when queries are fewer than keys would not."""
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 1000)
        a = (torch.arange(40) * 7 + 11) % vocab
        b = (torch.arange(20) * 5 + 301) % vocab
        try:
            pool = self.kv_pool()
            ra, rb = pool.allocate(len(a)), pool.allocate(len(b))
            if ra is None or rb is None:
                return False
            try:
                first = self.pooled_surprisal([(ra, 0, a[:25], 1), (rb, 0, b, 1)])
                second = self.pooled_surprisal([(ra, 25, a[25:], 1)])[0]
            finally:
                pool.release(ra)
                pool.release(rb)
            with self.lock:
                want = [self._loss(x.unsqueeze(0).to(self.device))[0].float().cpu() for x in (a, b)]
        except Exception as exc:  # noqa: BLE001 - any failure: windows rescored from scratch
            logger.info("pooled KV cache not usable with this model (%s); rescoring windows from scratch", exc)
            return False
        got = torch.cat([first[0], second]).float()
        ok = (self._agrees(got, torch.cat([want[0][:24], want[0][25:]]))
              and self._agrees(first[1].float(), want[1]))
        if not ok:
            logger.info("pooled window steps disagree with whole-sequence surprisals; rescoring windows from scratch")
        return ok

    def kv_pool(self) -> KVPool:
        """The pool, made on first use: ``pool_tokens`` slots (default: an eighth of the free
        device memory on a GPU, 64k tokens on a CPU)."""
        with self.lock:
            if self._kv_pool is None:
                tokens = self.pool_tokens
                if tokens is None:
                    if self.device.type == "cuda":
                        free, _ = torch.cuda.mem_get_info(self.device)
                        tokens = free // 8 // KVPool.bytes_per_token(self.model)
                    else:
                        tokens = 65536
                self._kv_pool = KVPool(self.model, int(tokens))
            return self._kv_pool

    def _pooled_loss(self, ids: torch.Tensor, pos: torch.Tensor, flat: torch.Tensor, meta: PooledPass) -> torch.Tensor:
        """The decoder over laid-out new tokens (their streams' prefixes in the pool), the LM
        head at ``flat`` alone. Through the compiled layers (the pooled attention itself is
        left out of them) until that fails once, then uncompiled."""
        through = self.compile and self._pool_compiled
        with contextlib.nullcontext() if through else uncompiled(self.model), kv_pool.active(meta):
            hidden = self.model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                                              attention_mask=self._no_mask, lingua_pooled=True).last_hidden_state
            # compiled, the log-softmax reads the half-precision logits once (eager, it writes a float32 copy)
            return self._head_at(hidden, ids, flat, compiled(token_surprisal) if through else token_surprisal)

    def _pooled_layout(self, items: list[tuple[int, int, torch.Tensor, int]], graphs: bool):
        """Host side of a pooled pass: ids, position ids, write slots, gathered key slots,
        boundaries and the flat indices of the scored positions, bucketed when ``graphs``."""
        pool = self.kv_pool()
        n = np.array([len(new) for _, _, new, _ in items], dtype=np.int64)
        cached = np.array([c for _, c, _, _ in items], dtype=np.int64)
        region = np.array([r for r, _, _, _ in items], dtype=np.int64)
        firsts = np.array([f for _, _, _, f in items], dtype=np.int64)
        total, keys = int(n.sum()), int((n + cached).sum())
        begin = np.cumsum(n) - n
        within = np.arange(total) - np.repeat(begin, n)
        klen = n + cached
        kbegin = np.cumsum(klen) - klen
        scored = np.nonzero(within >= np.repeat(firsts, n))[0]
        if graphs:
            edges = _length_edges(None)
            width = _bucket(total, edges)
            kwidth = _bucket(keys, edges)
            # few graph shapes (each is captured once, and capturing while callers wait costs them):
            # coarse buckets for everything but the token counts
            seqs = next(b for b in (16, 64, POOLED_SEQS) if len(items) <= b)
            longest = next((b for b in (512, 2048) if int(n.max()) <= b), max(int(n.max()), self.max_positions or 0))
            head = width // 2 if len(scored) <= width // 2 else width
        else:
            width, kwidth, seqs, longest, head = total, keys, len(items), int(n.max()), len(scored)
        ids = np.full(width, self.pad_id, dtype=np.int64)
        ids[:total] = torch.cat([new for _, _, new, _ in items]).numpy()
        pos = np.zeros(width, dtype=np.int64)
        pos[:total] = np.repeat(cached, n) + within
        slots = np.full(width, pool.scratch, dtype=np.int64)
        slots[:total] = np.repeat(region + cached, n) + within
        gathered = np.full(kwidth, pool.scratch, dtype=np.int64)
        gathered[:keys] = np.repeat(region, klen) + np.arange(keys) - np.repeat(kbegin, klen)
        cu_q = np.full(seqs + 1, total, dtype=np.int32)
        cu_q[: len(items)] = begin
        cu_k = np.full(seqs + 1, keys, dtype=np.int32)
        cu_k[: len(items)] = kbegin
        flat = np.zeros(head, dtype=np.int64)
        flat[: len(scored)] = scored - 1
        longest_k = self.max_positions or max(int(klen.max()), 1)
        sizes = np.maximum(n - firsts, 0).tolist()  # an item whose first is past its end scores nothing
        return ((width, kwidth, seqs, longest, head, longest_k),
                [torch.from_numpy(x) for x in (ids, pos, slots, gathered, cu_q, cu_k, flat)], sizes)

    def _pooled_graph(self, key: tuple[int, ...]):
        """The captured graph of a pooled pass's bucketed shape (None when capture fails)."""
        hit = self._captured.get(("pooled", *key))
        if hit is not None or not self.graphs:
            return hit
        width, kwidth, seqs, longest, head, longest_k = key
        pool = self.kv_pool()
        dev = self.device
        ids = torch.full((1, width), self.pad_id, dtype=torch.long, device=dev)
        pos = torch.zeros((1, width), dtype=torch.long, device=dev)
        slots = torch.full((width,), pool.scratch, dtype=torch.long, device=dev)
        keys = torch.full((kwidth,), pool.scratch, dtype=torch.long, device=dev)
        cu_q = torch.zeros(seqs + 1, dtype=torch.int32, device=dev)
        cu_k = torch.zeros(seqs + 1, dtype=torch.int32, device=dev)
        flat = torch.zeros(head, dtype=torch.long, device=dev)
        meta = PooledPass(pool, slots, keys, cu_q, cu_k, min(longest, width), longest_k)
        compiled_now = bool(self.compile) and self._pool_compiled
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            if compiled_now:  # compile before the capture: compiling while capturing fails
                self._pooled_loss(ids, pos, flat, meta)
                torch.cuda.synchronize(dev)
            with no_recompiling() if compiled_now else contextlib.nullcontext():
                graph, out = capture_graph(lambda: self._pooled_loss(ids, pos, flat, meta), dev, self._pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure: pooled passes run eagerly
            if _is_oom(exc):
                raise
            if compiled_now:
                logger.warning("pooled passes through the compiled layers failed (%s); running them uncompiled", exc)
                self._pool_compiled = False
                return self._pooled_graph(key)
            logger.warning("CUDA graph capture of pooled passes failed (%s); running them eagerly", exc)
            self._pooled_graphs = False
            return None
        self._captured[("pooled", *key)] = hit = (graph, (ids, pos, slots, keys, cu_q, cu_k, flat), out)
        return hit

    def pooled_surprisal(self, items: Sequence[tuple[int, int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Surprisals of ITPC streams whose prefixes are in the KV pool. Each item is
        ``(region, cached, new, first)``: the stream's region, how many of its positions
        the pool holds (later ones are overwritten), its next tokens, and the index in
        ``new`` of the first token to score (at least 1: a token's score comes from the
        position before it). Returns the surprisals of ``new[first:]`` for each item;
        every item's keys and values are in the pool afterwards."""
        return self.launch_pooled(items)()

    @torch.inference_mode()
    def launch_pooled(self, items: Sequence[tuple[int, int, torch.Tensor, int]]) -> Callable[[], list[torch.Tensor]]:
        """Start :meth:`pooled_surprisal`'s passes; returns a function that waits for them
        and gives the surprisals. Passes launched later (by anyone) run after these on
        the device, so they see these items' keys and values in the pool."""
        items = [(int(r), int(c), torch.as_tensor(x, dtype=torch.long).reshape(-1), max(1, int(f)))
                 for r, c, x, f in items]
        results: list[torch.Tensor] = [torch.zeros(0)] * len(items)
        chunk: list[int] = []
        tokens = 0
        launched = []
        for i in list(range(len(items))) + [-1]:
            n = len(items[i][2]) if i >= 0 else 0
            if i >= 0 and (not chunk or (tokens + n <= self.max_tokens and len(chunk) < POOLED_SEQS)):
                chunk.append(i)
                tokens += n
                continue
            if chunk:
                launched.append((chunk, self._launch_pooled([items[j] for j in chunk])))
            chunk, tokens = [i], n

        def wait() -> list[torch.Tensor]:
            for chunk, (loss, sizes) in launched:
                loss = loss.to("cpu")
                for j, part in zip(chunk, loss[: sum(sizes)].split(sizes)):
                    results[j] = part
            return results
        return wait

    def _launch_pooled(self, items: list[tuple[int, int, torch.Tensor, int]]):
        """Start one pooled pass (a captured graph of its bucketed shape where graphs are
        on): ``(loss on the device, scored tokens per item)``; the loss is read later, so
        the next pass is laid out while this one runs."""
        graphs = self.graphs and self._pooled_graphs
        key, host, sizes = self._pooled_layout(items, graphs)
        with self.lock:
            captured = self._pooled_graph(key) if graphs else None
            if captured is not None:
                graph, static, out = captured
                for dst, src in zip(static, host):
                    dst.copy_(src.view(dst.shape), non_blocking=True)
                graph.replay()
                loss = out.clone()
            else:
                ids, pos, slots, keys, cu_q, cu_k, flat = (x.to(self.device) for x in host)
                meta = PooledPass(self.kv_pool(), slots, keys, cu_q, cu_k, key[3], key[5])
                try:
                    loss = self._pooled_loss(ids.view(1, -1), pos.view(1, -1), flat, meta)
                except Exception as exc:  # noqa: BLE001 - compiled: rerun uncompiled (the writes repeat alike)
                    if _is_oom(exc) or not (self.compile and self._pool_compiled):
                        raise
                    logger.warning("pooled passes through the compiled layers failed (%s); running them uncompiled", exc)
                    self._pool_compiled = False
                    loss = self._pooled_loss(ids.view(1, -1), pos.view(1, -1), flat, meta)
            self.forward_passes += 1
            self.positions_run += key[0]
            self.head_positions += key[4]
            self.tokens_run += sum(len(x) for _, _, x, _ in items)
        return loss, sizes

    def surprisal(self, seqs: Sequence[Sequence[int] | torch.Tensor], max_rows: int | None = None,
                  starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Surprisal of tokens ``start .. len-1`` of every sequence (float32, on the CPU).

        ``starts`` (default 1 each: every token but the first, which has no context)
        lets a caller that needs only a span (ranking scores a question after a document)
        skip the LM head before it, where passes run eagerly. Sequences shorter than two
        tokens give empty tensors. ``max_rows`` caps the sequences per forward pass
        (default: the runner's ``max_rows``).
        """
        return self.launch_surprisal(seqs, max_rows, starts)()

    @torch.inference_mode()
    def launch_surprisal(self, seqs: Sequence[Sequence[int] | torch.Tensor], max_rows: int | None = None,
                         starts: Sequence[int] | None = None) -> Callable[[], list[torch.Tensor]]:
        """Start :meth:`surprisal`'s passes; returns a function that waits for them and
        gives the surprisals. Packed passes (a GPU) run on the device while the caller
        goes on (the scoring queue gathers its next round meanwhile); padded batches run
        before this returns."""
        max_rows = max_rows or self.max_rows
        tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
        lengths = [t.shape[0] for t in tensors]
        firsts = [min(max(1, int(st)), n) for st, n in zip(starts or [1] * len(tensors), lengths)]
        results: list[torch.Tensor] = [torch.zeros(0)] * len(tensors)
        order = sorted((i for i, n in enumerate(lengths) if n - firsts[i] >= 1), key=lambda i: lengths[i])
        if len(order) > 1 and self._packing():
            packed = self._launch_surprisal_packed(tensors, lengths, firsts, order, max_rows)

            def wait() -> list[torch.Tensor]:
                for i, loss in packed().items():
                    results[i] = loss
                return results
            return wait
        batch: list[int] = []
        real = 0  # tokens of the batch's sequences
        for i in order + [-1]:
            if i >= 0 and (not batch or self._fits(len(batch) + 1, len(tensors[i]), real + len(tensors[i]), max_rows)):
                batch.append(i)
                real += len(tensors[i])
                continue
            if batch:
                for j, loss in zip(batch, self._run_split([tensors[j] for j in batch], [firsts[j] for j in batch])):
                    results[j] = loss
            batch, real = [i], len(tensors[i]) if i >= 0 else 0
        return lambda: results

    def _fits(self, rows: int, width: int, real: int, max_rows: int) -> bool:
        """Whether ``rows`` sequences, the longest ``width`` tokens and ``real`` tokens in
        all, may share one forward pass."""
        padded = math.prod(self._shape(rows, width))
        if rows > max_rows or padded > self.max_tokens:
            return False
        return self.max_padding is None or padded - real <= self.max_padding * padded
