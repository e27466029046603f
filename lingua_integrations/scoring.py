"""The small LM as a scorer: per-token surprisal, with and without a KV cache.

Everything the causal-LM methods need from the model goes through
:class:`CausalScorer`: surprisal ``-log p(x_i | x_<i)`` of every token of a sequence
(optionally continuing from a cached prefix) and the mean surprisal of a span given
what precedes it (perplexity ranking), batched over many texts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .models import LoadedModel


class CausalScorer:
    """Surprisal computations on one loaded causal LM (shared, thread-safe)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.batch_size = max(1, int(batch_size))

    # -- tokenization helpers -------------------------------------------------
    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def count(self, text: str, special: bool = True) -> int:
        """Small-LM tokens in ``text`` (with the tokenizer's special tokens, as the reference counts)."""
        return len(self.encode(text, special))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)

    # -- surprisal --------------------------------------------------------------
    @torch.inference_mode()
    def surprisal(self, ids: torch.Tensor, cache: Any = None, cached: int = 0) -> tuple[torch.Tensor, Any]:
        """Surprisal of tokens ``cached+1 .. len(ids)-1`` given everything before them.

        ``ids`` is the whole 1-D sequence; the first ``cached`` tokens are already in
        ``cache`` (a transformers ``Cache``) and are not recomputed. Returns the
        surprisals (float32, length ``len(ids) - cached - 1``) and the cache, now
        covering all of ``ids``.
        """
        chunk = ids[cached:].unsqueeze(0).to(self.device)
        with self.loaded.lock:
            out = self.model(input_ids=chunk, past_key_values=cache, use_cache=True)
        logits = out.logits[0, :-1].float()
        labels = chunk[0, 1:]
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, out.past_key_values

    def sequence_surprisal(self, ids: torch.Tensor) -> torch.Tensor:
        """Surprisal of tokens ``1 .. len(ids)-1`` of a sequence of any length: windows of
        the model's length that overlap by one token, so every token is scored once."""
        window = self.loaded.max_positions
        out = []
        for s in range(0, max(1, len(ids) - 1), window - 1):
            loss, _ = self.surprisal(ids[s : s + window])
            out.append(loss.to("cpu", torch.float32))
        return torch.cat(out) if out else torch.zeros(0)

    @torch.inference_mode()
    def span_perplexities(self, items: Sequence[tuple[list[int], int]]) -> list[float]:
        """Mean surprisal of ``ids[cond:]`` given ``ids[:cond]`` for each ``(ids, cond)``.

        ``cond`` is the index of the first token that is scored (0 scores every token
        but the first, which has no context). Sequences longer than the model's window
        keep their last ``max_positions`` tokens, so the scored span survives.
        Texts are scored in right-padded batches sorted by length, so padding is small
        and positions of real tokens are unchanged.
        """
        window = self.loaded.max_positions
        prepared = []
        for ids, cond in items:
            if len(ids) > window:
                cut = len(ids) - window
                ids, cond = ids[cut:], max(1, cond - cut)
            prepared.append((ids, max(1, cond)))
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][0]))
        results: list[float] = [float("nan")] * len(prepared)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for b in range(0, len(order), self.batch_size):
            batch = [prepared[i] for i in order[b : b + self.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            with self.loaded.lock:
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            loss = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:].to(self.device), reduction="none"
            ).cpu()
            for row, (ids, cond) in enumerate(batch):
                span = loss[row, cond - 1 : len(ids) - 1]
                results[order[b + row]] = float(span.mean()) if span.numel() else float("nan")
        return results
