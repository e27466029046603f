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
stays small and memory stays bounded; a CUDA out-of-memory error halves the batch and
retries, down to a single sequence, before the error reaches the caller.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

MIN_WINDOW = 128  # the shortest window a sequence is cut into under memory pressure
# bucket edges for sequence lengths: powers of two and the midpoints between them
_LENGTHS = sorted({int(b * m) for b in (2 ** k for k in range(5, 18)) for m in (1.0, 1.5)})


def _bucket(n: int, edges: Sequence[int]) -> int:
    for e in edges:
        if e >= n:
            return e
    return n


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class SurprisalRunner:
    """Per-token surprisal of many sequences on one model (thread-safe through ``lock``).

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``logits``.
        lock: serialises forward passes on the model (shared with other users of it).
        max_tokens: padded tokens per forward pass (bounds the logits' memory).
        graphs: ``"auto"`` (CUDA graphs on CUDA devices), ``True`` or ``False``.
        pad_id: the id written into padding positions.
    """

    def __init__(self, model, lock: threading.RLock, *, max_tokens: int = 16384, max_rows: int = 64,
                 graphs: bool | str = "auto", pad_id: int = 0, max_positions: int | None = None) -> None:
        self.model = model
        self.lock = lock
        self.device = next(model.parameters()).device
        self.max_tokens = max(1, int(max_tokens))
        self.max_rows = max(1, int(max_rows))
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.graphs = (self.device.type == "cuda") if graphs == "auto" else bool(graphs) and self.device.type == "cuda"
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        self.forward_passes = 0  # diagnostics: device passes run
        self.oom_events = 0  # diagnostics: out-of-memory errors recovered from

    # -- the computation --------------------------------------------------------
    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        # cross-entropy reduced along the contiguous vocabulary axis (F.cross_entropy wants
        # a (batch, vocabulary, position) layout, ~10x slower on GPUs)
        return torch.logsumexp(logits, -1) - logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

    def _graph(self, shape: tuple[int, int]):
        """The captured graph of ``shape`` (captured on first use; None when capture fails)."""
        hit = self._captured.get(shape)
        if hit is not None or not self.graphs:
            return hit
        static = torch.full(shape, self.pad_id, dtype=torch.long, device=self.device)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._loss(static)  # warm-up: lazy initialisation must not happen during capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._loss(static)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            if _is_oom(exc):
                raise
            logger.warning("CUDA graph capture failed (%s); running eagerly", exc)
            self.graphs = False
            return None
        self._captured[shape] = (graph, static, out)
        return self._captured[shape]

    def _shape(self, rows: int, width: int) -> tuple[int, int]:
        """The padded shape a batch runs in: bucketed when graphs are on (few captures)."""
        if not self.graphs:
            return rows, width
        edges = [e for e in _LENGTHS if not self.max_positions or e <= self.max_positions]
        return 1 << (rows - 1).bit_length(), _bucket(width, edges + ([self.max_positions] if self.max_positions else []))

    def _run_batch(self, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        rows, width = self._shape(len(seqs), max(len(s) for s in seqs))
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
        with self.lock:
            captured = self._graph((rows, width)) if self.graphs else None
            if captured is not None:
                graph, static, out = captured
                static.copy_(ids, non_blocking=True)
                graph.replay()
                loss = out.to("cpu", copy=True)
            else:
                loss = self._loss(ids.to(self.device)).to("cpu")
            self.forward_passes += 1
        return [loss[r, : len(s) - 1] for r, s in enumerate(seqs)]

    def _run_split(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run a batch; on CUDA out-of-memory halve it and retry, and score a single
        sequence that still does not fit as two windows overlapping by one token (as
        sequences longer than the model's window are scored), down to ``MIN_WINDOW``."""
        try:
            return self._run_batch(seqs)
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
                return self._run_split(seqs[:half]) + self._run_split(seqs[half:])
            ids = seqs[0]
            if len(ids) < 2 * MIN_WINDOW:
                raise MemoryError(
                    f"GPU memory cannot hold even {len(ids)} tokens of this model: free GPU memory (other "
                    "processes, other models), use a smaller model or dtype, or run on the CPU") from exc
            logger.warning("out of GPU memory on one sequence of %d tokens; scoring it in two windows", len(ids))
            h = len(ids) // 2
            return [torch.cat(self._run_split([ids[: h + 1]]) + self._run_split([ids[h:]]))]

    @torch.inference_mode()
    def surprisal(self, seqs: Sequence[Sequence[int] | torch.Tensor], max_rows: int | None = None) -> list[torch.Tensor]:
        """Surprisal of tokens ``1 .. len-1`` of every sequence (float32, on the CPU).

        Sequences shorter than two tokens give empty tensors. ``max_rows`` caps the
        sequences per forward pass (default: the runner's ``max_rows``).
        """
        max_rows = max_rows or self.max_rows
        tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
        results: list[torch.Tensor] = [torch.zeros(0)] * len(tensors)
        order = sorted((i for i, t in enumerate(tensors) if len(t) >= 2), key=lambda i: len(tensors[i]))
        batch: list[int] = []
        for i in order + [-1]:
            if i >= 0 and (not batch or (len(batch) < max_rows
                                         and math.prod(self._shape(len(batch) + 1, len(tensors[i]))) <= self.max_tokens)):
                batch.append(i)
                continue
            if batch:
                for j, loss in zip(batch, self._run_split([tensors[j] for j in batch])):
                    results[j] = loss
            batch = [i]
        return results
