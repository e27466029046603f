"""Device execution of LLMLingua-2's one computation: the keep probability of every token
of many encoder windows.

An encoder pass costs its kernel launches in host time whatever the batch (a 24-layer
XLM-R-large shape: ~400 module calls, 10-20 ms of Python), so on a GPU the runner
captures a **CUDA graph** per (rows, width) bucket and replays it (~0.1 ms). Cheap
launches let the classifier send a long text's windows to the device in small groups as
soon as they are tokenized, so the device works while the host still tokenizes the rest.
The padding mask goes in as a prepared 4-D boolean mask: transformers' own mask code would
otherwise test the mask for "no padding" on the host, which a captured graph cannot do.
The first replay is checked once against an eager pass with the plain 2-D mask (a model
with mask code of its own could read the 4-D mask differently); any difference beyond
half-precision noise turns graphs off.

Without graphs (a CPU, ``graphs=False``, or a model whose pass does not capture) the
windows run eagerly, sorted by length into batches.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np
import torch

from .runner import capture_graph

logger = logging.getLogger(__name__)

GRAPH_ROWS = 16  # windows per replay; fewer are padded up to the next of ROW_BUCKETS
ROW_BUCKETS = (1, 2, 4, 8, 12, 16)
MIN_WIDTH = 64


class KeepProbRunner:
    """Keep probabilities of token windows on one token-classification model (one per
    loaded model, so every engine and thread sharing the model shares its graphs).

    Args:
        model: a token classifier whose forward takes ``input_ids`` and ``attention_mask``
            and returns ``logits`` of shape (rows, width, labels).
        lock: serialises passes on the model (shared with its other users).
        keep_label: the label whose probability is "keep".
        pad_id: the id written into padding.
        max_positions: the longest sequence the model takes (caps the width buckets).
        graphs: ``"auto"`` (CUDA graphs on CUDA devices), ``True`` or ``False``.
    """

    def __init__(self, model, lock: threading.RLock, keep_label: int, pad_id: int = 0,
                 max_positions: int = 512, graphs: bool | str = "auto") -> None:
        self.model = model
        self.lock = lock
        self.keep_label = keep_label
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs == "auto" else bool(graphs) and cuda
        self._captured: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._checked = False  # has a replay been compared with an eager pass yet?
        self.forward_passes = 0  # diagnostics

    def _probs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits.float().softmax(-1)[..., self.keep_label]

    def _graph(self, rows: int, width: int):
        """``(graph, static ids, static mask, probs)`` of a bucket, captured on first use;
        None when capture fails (graphs are then off for this model)."""
        hit = self._captured.get((rows, width))
        if hit is not None or not self.graphs:
            return hit
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        mask[:, 0] = 1  # a row with nothing to attend to would give NaN; padding rows see their first position
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph, probs = capture_graph(lambda: self._probs(ids, mask.bool()[:, None, None, :]), self.device,
                                         self._pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            logger.warning("CUDA graph capture of the token classifier failed (%s); running eagerly", exc)
            self.graphs = False
            return None
        self._captured[(rows, width)] = (graph, ids, mask, probs)
        return self._captured[(rows, width)]

    def _check(self, replayed: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Once per runner: the first replay against an eager pass with the plain 2-D mask on
        the same windows. A model that reads the prepared 4-D mask differently (its own
        mask code) would give other probabilities without an error; then graphs go off.
        Returns the probabilities to use."""
        self._checked = True
        eager = self._probs(ids, mask)
        real = mask.bool()
        gap = float((replayed[real] - eager[real]).abs().max()) if real.any() else 0.0
        if gap > 0.02:  # half-precision noise is ~1e-3; a misread mask moves them by far more
            logger.warning("the token classifier's CUDA graph gave other keep probabilities than an eager pass "
                           "(max difference %.3f); running eagerly", gap)
            self.graphs = False
            return eager
        return replayed

    def _width(self, n: int) -> int:
        """The padded width a graph of longest sequence ``n`` runs in (a power of two, or the model's limit)."""
        width = max(MIN_WIDTH, 1 << (n - 1).bit_length())
        return max(n, min(width, self.max_positions))

    def launch(self, seqs: Sequence[np.ndarray], pre: int, suf: int, batch_size: int) -> torch.Tensor:
        """The keep probability of every scored token (all but ``pre`` leading and ``suf``
        trailing special tokens) of every sequence, concatenated in sequence order: a flat
        float32 device tensor, launched, not waited for. Eagerly, up to ``batch_size``
        sequences of similar length run per pass; with graphs, up to ``GRAPH_ROWS`` in
        the given order."""
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        scored = np.maximum(lengths - pre - suf, 0)
        starts = np.concatenate([[0], np.cumsum(scored)])
        if self.graphs:
            order = list(range(len(seqs)))
            step = GRAPH_ROWS
        else:
            order = sorted(range(len(seqs)), key=lambda k: lengths[k])
            step = max(1, batch_size)
        batches = []
        for b in range(0, len(order), step):
            members = order[b : b + step]
            longest = int(lengths[members].max())
            if self.graphs:
                rows = next(r for r in ROW_BUCKETS if r >= len(members))
                width = self._width(longest)
            else:
                rows, width = len(members), longest
            ids = np.full((rows, width), self.pad_id, dtype=np.int64)
            mask = np.zeros((rows, width), dtype=np.int64)
            mask[:, 0] = 1
            for row, k in enumerate(members):
                ids[row, : lengths[k]] = seqs[k]
                mask[row, : lengths[k]] = 1
            rows_idx = np.repeat(np.arange(len(members)), scored[members])
            cols = np.concatenate([np.arange(pre, pre + scored[k]) for k in members])
            dest = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in members])
            batches.append((ids, mask, rows_idx, cols, dest))
        # one host-to-device copy for every batch's inputs and gather indices
        sizes = [x.size for batch in batches for x in batch]
        moved = torch.from_numpy(np.concatenate([x.ravel() for batch in batches for x in batch]))
        moved = moved.to(self.device).split(sizes)
        flat = torch.zeros(int(starts[-1]), device=self.device)
        with self.lock:
            for k, (ids, mask, *_rest) in enumerate(batches):
                t_ids, t_mask, t_rows, t_cols, t_dest = moved[5 * k : 5 * k + 5]
                captured = self._graph(*ids.shape) if self.graphs else None
                if captured is not None:
                    graph, static_ids, static_mask, probs = captured
                    static_ids.copy_(t_ids.view(ids.shape))
                    static_mask.copy_(t_mask.view(mask.shape))
                    graph.replay()
                    if not self._checked:
                        probs = self._check(probs, t_ids.view(ids.shape), t_mask.view(mask.shape))
                else:
                    probs = self._probs(t_ids.view(ids.shape), t_mask.view(mask.shape))
                flat[t_dest] = probs[t_rows, t_cols]  # read before the next replay overwrites it
                self.forward_passes += 1
        return flat
