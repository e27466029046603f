"""The small LM as a scorer: per-token surprisal, with and without a KV cache.

Everything the causal-LM methods need from the model goes through
:class:`CausalScorer`: surprisal ``-log p(x_i | x_<i)`` of every token of a sequence
(optionally continuing from a cached prefix) and the mean surprisal of a span given
what precedes it (perplexity ranking), batched over many texts.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .compilation import uncompiled
from .kv_graphs import StaticPool
from .models import LoadedModel, cache_keyword, returned_cache


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_type: type) -> bool:
    """Whether a model class's forward takes transformers' ``logits_to_keep`` (a
    remote-code model may not)."""
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


class CausalScorer:
    """Surprisal computations on one loaded causal LM (shared, thread-safe).

    Args:
        loaded: the model.
        batch_size: most sequences per forward pass.
        kv_cache: ``"auto"``: ITPC extends a KV cache window by window where arithmetic
            is the cost (on the CPU, and for models over 1B parameters); a small model on
            a GPU is bound by kernel launches, so it rescores each window's view from
            scratch, which lets the views of concurrent calls (and of LongLLMLingua's two
            streams) share one device batch and one captured CUDA graph.
        queue: ``"auto"``: on a GPU, scoring requests go through the model's
            :class:`~.serving.ScoringQueue`, batched with concurrent callers.
        static: ``"auto"``: when ITPC extends a KV cache on a GPU, it does so in a static
            cache with a captured CUDA graph per window size (:mod:`.kv_graphs`).
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, kv_cache: bool | str = "auto",
                 queue: bool | str = "auto", static: bool | str = "auto") -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.batch_size = max(1, int(batch_size))
        on_gpu = str(self.device).startswith("cuda")
        big = sum(p.numel() for p in self.model.parameters()) > 1e9  # compute-bound even on a GPU
        self.kv_cache = (not on_gpu or big) if kv_cache == "auto" else bool(kv_cache)
        self.use_queue = on_gpu if queue == "auto" else bool(queue)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # ITPC on a GPU with the KV cache: a static cache and captured graphs per window size
        self.static = StaticPool(self.model, loaded.lock, loaded.max_positions, pad if pad is not None else 0,
                                 enabled=on_gpu and self.kv_cache if static == "auto" else bool(static))

    # -- tokenization helpers -------------------------------------------------
    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def encode_many(self, texts: Sequence[str], special: bool = False) -> list[list[int]]:
        """Token ids of many texts in one (parallel) tokenizer call."""
        return self.tokenizer(list(texts), add_special_tokens=special).input_ids if texts else []

    def count(self, text: str, special: bool = True) -> int:
        """Small-LM tokens in ``text`` (with the tokenizer's special tokens, as the reference counts)."""
        return len(self.encode(text, special))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)

    def session(self):
        """Context manager around one compression call (lets the queue wait for company)."""
        return self.loaded.scoring_queue().session() if self.use_queue else contextlib.nullcontext()

    # -- surprisal --------------------------------------------------------------
    def batch_surprisal(self, seqs: Sequence[Sequence[int] | torch.Tensor],
                        starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Surprisal of tokens ``start .. len-1`` of each sequence (``starts`` default 1;
        each sequence at most the model's window), float32 on the CPU: one padded batch,
        shared with concurrent callers on a GPU."""
        q = self.loaded.scoring_queue()
        if not self.use_queue:
            return q.runner.surprisal(seqs, max_rows=self.batch_size, starts=starts)
        return q.surprisal(seqs, starts)

    # -- streams with a pooled KV cache (kv_pool.py) ------------------------------
    @property
    def pooled(self) -> bool:
        """Whether ITPC streams keep their KV cache in the device pool between window steps
        (only where windows would otherwise be rescored from scratch)."""
        return not self.kv_cache and bool(getattr(self.loaded.scoring_queue(), "pooling", False))

    def pool_allocate(self, n: int) -> int | None:
        """A pool region for a stream of ``n`` tokens (None: no room, score from scratch)."""
        return self.loaded.scoring_queue().allocate(n)

    def pool_release(self, region: int) -> None:
        """Give a stream's pool region back."""
        self.loaded.scoring_queue().release(region)

    def pooled_surprisal(self, items: Sequence[tuple[int, int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Surprisals of pooled streams' next tokens (see
        :meth:`~.runner.SurprisalRunner.pooled_surprisal`), batched with concurrent callers
        on a GPU."""
        q = self.loaded.scoring_queue()
        return q.pooled_surprisal(items) if self.use_queue else q.runner.pooled_surprisal(items)

    @torch.inference_mode()
    def surprisal(self, ids: torch.Tensor, cache: Any = None, cached: int = 0,
                  first: int | None = None) -> tuple[torch.Tensor, Any]:
        """Surprisal of tokens ``first .. len(ids)-1`` (default ``cached+1``) given
        everything before them.

        ``ids`` is the whole 1-D sequence; the first ``cached`` tokens are already in
        ``cache`` (a transformers ``Cache``) and are not recomputed. Tokens between
        ``cached`` and ``first`` go through the decoder (the cache needs them) but not
        through the LM head, a fifth of a small LM's arithmetic: an ITPC window step
        rebuilds the just-compressed window's cache without needing its scores. Returns
        the surprisals (float32, length ``len(ids) - first``) and the cache, now
        covering all of ``ids``.
        """
        first = cached + 1 if first is None else min(len(ids), max(cached + 1, first))
        chunk = ids[cached:].unsqueeze(0).to(self.device)
        keep = len(ids) - first + 1  # logit columns predicting tokens first .. end (the last one unused)
        with self.loaded.lock, uncompiled(self.model):
            kwargs = {"use_cache": True, cache_keyword(self.model): cache}
            if _takes_logits_to_keep(type(self.model)):  # not retried on a TypeError: the cache may have moved
                kwargs["logits_to_keep"] = keep
            out = self.model(input_ids=chunk, **kwargs)  # a model that ignores it returns every column
        logits = out.logits[0, -keep:-1].float()
        labels = chunk[0, first - cached :]
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, returned_cache(out)

    def sequences_surprisal(self, seqs: Sequence[torch.Tensor], starts: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Surprisal of tokens ``start .. len-1`` of sequences of any length (``starts``
        default 1 each): windows of the model's length that overlap by one token, so every
        token is scored once; the windows of all sequences go in one batch. A window
        that ends before its sequence's start is not scored."""
        window = self.loaded.max_positions
        pieces, firsts, owners = [], [], []
        for k, ids in enumerate(seqs):
            first = 1 if starts is None else max(1, int(starts[k]))
            for s in range(0, max(1, len(ids) - 1), window - 1):
                if s + window - 1 < first:  # ends before the first token asked for
                    continue
                pieces.append(ids[s : s + window])
                firsts.append(max(1, first - s))
                owners.append(k)
        losses = self.batch_surprisal(pieces, starts=firsts)
        out: list[list[torch.Tensor]] = [[] for _ in seqs]
        for k, loss in zip(owners, losses):
            out[k].append(loss)
        return [torch.cat(parts) if parts else torch.zeros(0) for parts in out]

    def sequence_surprisal(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`sequences_surprisal` of one sequence."""
        return self.sequences_surprisal([ids])[0]

    def span_perplexities(self, items: Sequence[tuple[list[int], int]]) -> list[float]:
        """Mean surprisal of ``ids[cond:]`` given ``ids[:cond]`` for each ``(ids, cond)``.

        ``cond`` is the index of the first token that is scored (0 scores every token
        but the first, which has no context). Sequences longer than the model's window
        keep their last ``max_positions`` tokens, so the scored span survives.
        """
        window = self.loaded.max_positions
        prepared = []
        for ids, cond in items:
            if len(ids) > window:
                cut = len(ids) - window
                ids, cond = ids[cut:], max(1, cond - cut)
            prepared.append((ids, max(1, cond)))
        spans = self.batch_surprisal([ids for ids, _ in prepared], starts=[cond for _, cond in prepared])
        return [float(span.mean()) if span.numel() else float("nan") for span in spans]
