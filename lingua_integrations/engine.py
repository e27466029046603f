"""The shared compression engine: framework-free, one per (model, device, dtype).

Every adapter (LangChain, LlamaIndex, the CLI, the drop-in ``PromptCompressor``) calls
:meth:`CompressionEngine.compress`. The engine owns no per-call state, so it is safe
to call from many threads; the model's forward passes are serialised by the model's
lock in :mod:`.models`.

This module is the *default mode*: the papers' methods with budgets in target-LLM
tokens that the output actually meets. The reference's exact behaviour, quirks
included, lives in :mod:`.compat`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from . import budget as bc
from .itpc import iterative_compress
from .models import (DEFAULT_LLMLINGUA2_MODEL, DEFAULT_MODEL, EMBEDDED_MODELS, LoadedModel, ModelRegistry, options_key, resolve_device,
                     resolve_dtype)
from .evidence import select_evidence
from .lexical import bm25_scores
from .ranking import Ranked, fuse, rank_contexts
from .recovery import recover as _recover
from .scoring import CausalScorer
from .structured import parse_spans
from .token_classification import TokenClassifier, count_distinct, fit_total, prepare, select_words
from .units import Granularity, salient_units, token_units
from .tokens import DEFAULT_ENCODING, TokenCounter, TokenCounterLike
from .workers import HostWorkers, NotPortable

Method = Literal["llmlingua", "longllmlingua", "llmlingua2"]
METHODS = ("llmlingua", "longllmlingua", "llmlingua2")
Ranking = Literal["auto", "hybrid", "perplexity", "bm25"]
RANKINGS = ("auto", "hybrid", "perplexity", "bm25")
# hybrid ranking: BM25 counts this many times the small LM in the rank fusion (a 135M
# LM ranks NQ passages well below BM25; fusing still fixes some of BM25's misses)
LEXICAL_WEIGHT = 2.0
# below this token-level rate, whole documents are too many for the budget: the
# evidence step keeps sentences instead, and the fine step prunes them at this rate
EVIDENCE_RATE = 0.8
RERANK_DEPTH = 8  # hybrid ranking: the LM re-ranks at least this many of BM25's best
RERANK_MAX = 64  # ... and at most this many (BM25's best half of 5,000 documents is no shortlist)
# above this many target-LLM tokens a call is refused (the small LM reads every kept token:
# ~450 tokens/s on 2 CPU cores); engines take max_input_tokens= to change it
MAX_INPUT_TOKENS = 262_144
SEPARATOR = "\n\n"
RATE_TOLERANCE = 0.05  # the budget fit stops within +-5% of the target
HOST_WORKER_METHODS = ("llmlingua", "longllmlingua")  # what host workers run (LLMLingua-2: the calling thread)


def serving_session(method):
    """Run an engine call (or a wrapper's call, through its ``engine``) inside the model's
    serving session, so concurrent calls' device work is batched together."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any):
        with getattr(self, "engine", self).session():
            return method(self, *args, **kwargs)

    return wrapper


def host_offloaded(method):
    """Send an engine call to the engine's host workers when it has them and the call's
    method runs there (see :mod:`.workers`); otherwise run it here."""
    default = inspect.signature(method).parameters["method"].default

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any):
        workers = self._workers
        if workers is not None and workers.alive and kwargs.get("method", default) in HOST_WORKER_METHODS:
            try:
                return workers.compress(args, kwargs)
            except NotPortable:  # e.g. a context list holding unpicklable objects: fails here with a clear error
                pass
        return method(self, *args, **kwargs)

    return wrapper


@dataclass
class ContextResult:
    """What became of one input context."""

    index: int  # position in the caller's list
    kept: bool  # survived coarse selection (and kept at least one token)
    rank: int | None  # 0 = best by the ranking; None when no ranking was done
    text: str  # compressed text; "" when dropped
    origin_tokens: int  # target-LLM tokens of the original
    compressed_tokens: int  # target-LLM tokens of ``text``
    score: float | None = None  # ranking statistic (perplexity; lower is better for questions)
    words: list[tuple[str, float, bool]] | None = None  # LLMLingua-2 with return_words: (word, p(keep), kept)


@dataclass
class CompressionResult:
    """A compressed prompt and how it was made. ``contexts`` lists every input context,
    in input order, kept or not; ``order`` gives the kept ones in prompt order."""

    compressed_prompt: str
    origin_tokens: int
    compressed_tokens: int
    method: str
    contexts: list[ContextResult]
    order: list[int]
    instruction: str = ""
    question: str = ""
    target_tokens: float | None = None

    @property
    def rate(self) -> float:
        return self.compressed_tokens / self.origin_tokens if self.origin_tokens else 1.0

    @property
    def ratio(self) -> float:
        return self.origin_tokens / self.compressed_tokens if self.compressed_tokens else 1.0

    @property
    def kept_indices(self) -> list[int]:
        return list(self.order)

    @property
    def dropped_indices(self) -> list[int]:
        return [c.index for c in self.contexts if not c.kept]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"], d["ratio"] = self.rate, self.ratio
        d["kept_indices"], d["dropped_indices"] = self.kept_indices, self.dropped_indices
        return d


def validate_contexts(context: str | Sequence[str] | None, name: str = "context") -> list[str]:
    """Accept a string or a sequence of strings; reject anything else with a clear error."""
    if context is None:
        return []
    if isinstance(context, str):
        return [context]
    if isinstance(context, (bytes, bytearray)):
        raise TypeError(f"{name} must be text: decode bytes before compressing")
    if not isinstance(context, Iterable):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(context).__name__}")
    items = list(context)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] is {type(item).__name__}, not a string: pass text (e.g. doc.page_content)")
    return items


def validate_budget(rate: float | None, target_token: float | None) -> None:
    if target_token is not None and target_token != -1:
        if isinstance(target_token, bool) or not isinstance(target_token, (int, float)) or not math.isfinite(target_token):
            raise TypeError(f"target_token must be a number, got {target_token!r}")
        if target_token <= 0:
            raise ValueError(f"target_token must be positive (got {target_token}); use rate= for a relative budget")
        return
    if rate is None or isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise TypeError(f"rate must be a number in (0, 1], got {rate!r}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1] (the share of tokens to keep), got {rate}")


@dataclass
class _Layout:
    """Pieces of text joined by separators, tokenized once, with each token's owner."""

    ids: list[int]
    owner: list[int]  # index of the piece a token belongs to; -1 for separator tokens
    piece_chars: list[tuple[int, int]]
    offsets: list[tuple[int, int]]  # character span of each token in the joined text
    unit: list[int]  # tokens deleted together (one word, or the byte pieces of one glyph) share a unit
    text: str = ""  # the joined text

    @classmethod
    def build(cls, tokenizer, pieces: Sequence[str], sep: str = SEPARATOR,
              granularity: Granularity = "token") -> "_Layout":
        text, spans, pos = "", [], 0
        for i, p in enumerate(pieces):
            if i:
                text += sep
                pos += len(sep)
            spans.append((pos, pos + len(p)))
            text += p
            pos += len(p)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc.offset_mapping]
        return cls(list(enc.input_ids), _owners(spans, offsets), spans, offsets, token_units(text, offsets, granularity),
                   text)


def _owners(spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[int]:
    """The piece each token overlaps first (pieces sorted and disjoint), -1 for a token in a
    separator only. A token that starts at or after its piece's end moves to the next piece."""
    if not offsets or not spans:
        return [-1] * len(offsets)
    starts, ends = (np.asarray(x, dtype=np.int64) for x in zip(*spans))
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s, e = off[:, 0], off[:, 1]
    i = np.maximum(0, np.searchsorted(starts, s, side="right") - 1)
    n = len(spans)
    while True:  # past empty pieces (usually one step at most)
        j = np.minimum(i, n - 1)
        move = (i < n) & (ends[j] <= s) & ~((s == e) & (s == starts[j]))
        if not move.any():
            break
        i = i + move
    j = np.minimum(i, n - 1)
    return np.where((i < n) & (s < ends[j]) & (e > starts[j]), i, -1).tolist()


class CompressionEngine:
    """Compresses prompts with a small causal LM; shared by every adapter.

    >>> engine = CompressionEngine.shared()  # SmolLM2-135M, embedded, offline
    >>> result = engine.compress(docs, question="who wrote it?", rate=0.33)
    >>> result.compressed_prompt, result.kept_indices

    Args:
        model: embedded alias (``"smollm2-135m"``), local HF directory or hub id.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``"auto"`` (float32 on CPU; on a GPU float16 for the causal LM, bfloat16 for the
            LLMLingua-2 classifier: see :func:`~.models.resolve_dtype`) or an explicit dtype.
        token_counter: how target-LLM tokens are counted: a tiktoken encoding name
            (default ``"cl100k_base"``) or a callable ``text -> int``.
        batch_size: contexts scored together when ranking.
        max_input_tokens: calls with a longer prompt (target-LLM tokens) are refused with
            a ``ValueError`` before any model work, instead of keeping a service busy for
            minutes (a 2 MB document is ~500k tokens); ``None`` lifts the limit.
        model_options: ``trust_remote_code``, ``allow_pickle`` and other
            ``from_pretrained`` keyword arguments.
    """

    _shared: dict[tuple, "CompressionEngine"] = {}
    _shared_lock = threading.Lock()

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        token_counter: TokenCounterLike = None,
        batch_size: int = 8,
        llmlingua2_model: str | None = None,
        max_input_tokens: int | None = MAX_INPUT_TOKENS,
        **model_options: Any,
    ) -> None:
        self._configure(model, resolve_device(device), dtype, token_counter, batch_size, llmlingua2_model,
                        max_input_tokens, **model_options)
        if llmlingua2_model is None:
            self.scorer  # noqa: B018 - load now: the causal LM is what this engine is for

    def _configure(self, model: str, device: str, dtype: str | torch.dtype | None, token_counter: TokenCounterLike,
                   batch_size: int, llmlingua2_model: str | None, max_input_tokens: int | None,
                   **model_options: Any) -> None:
        """Settings and empty state, no model (host workers build their engines from this)."""
        self.model_name = model
        self.llmlingua2_model = llmlingua2_model
        self.count = TokenCounter(token_counter)
        self._token_counter = token_counter
        self.batch_size = batch_size
        self.max_input_tokens = max_input_tokens
        self._device, self._dtype, self._options = device, dtype, model_options
        self._scorer: CausalScorer | None = None
        self._classifier: TokenClassifier | None = None
        self._lazy = threading.Lock()
        self._rankings: dict[str, list[Ranked]] = {}  # recent coarse rankings (insertion-ordered)
        self._workers: HostWorkers | None = None
        self._workers_lock = threading.Lock()  # start/stop (not _lazy: starting takes seconds and needs the scorer)

    def _settings(self) -> dict[str, Any]:
        """What :meth:`_configure` needs besides the model and device (sent to host workers)."""
        return {"token_counter": self._token_counter, "batch_size": self.batch_size,
                "llmlingua2_model": self.llmlingua2_model, "max_input_tokens": self.max_input_tokens,
                **self._options}

    @property
    def scorer(self) -> CausalScorer:
        """The small causal LM (loaded on first use, shared through the registry)."""
        with self._lazy:
            if self._scorer is None:
                loaded = ModelRegistry.get_causal_lm(self.model_name, self._device, self._dtype, **self._options)
                self._scorer = CausalScorer(loaded, batch_size=self.batch_size)
            self._scorer.batch_size = self.batch_size
            return self._scorer

    @property
    def loaded(self) -> LoadedModel:
        return self.scorer.loaded

    @property
    def classifier(self) -> TokenClassifier:
        """The LLMLingua-2 token classifier (``llmlingua2_model``; by default the offline
        distilled MiniLM, see docs/distilled-model.md), loaded on first use."""
        with self._lazy:
            if self._classifier is None:
                loaded = ModelRegistry.get_token_classifier(self.llmlingua2_model or DEFAULT_LLMLINGUA2_MODEL,
                                                            self._device, self._dtype, **self._options)
                self._classifier = TokenClassifier(loaded, batch_size=max(16, self.batch_size))
            return self._classifier

    @classmethod
    def shared(
        cls,
        model: str = DEFAULT_MODEL,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        token_counter: TokenCounterLike = None,
        llmlingua2_model: str | None = None,
        **model_options: Any,
    ) -> "CompressionEngine":
        """The process-wide engine for these settings (created on first use)."""
        # normalise, so equivalent settings ("auto" vs "cpu" on a CPU machine, None vs
        # the default encoding) share one engine
        dev = resolve_device(device)
        counter_key = (token_counter or DEFAULT_ENCODING) if isinstance(token_counter, (str, type(None))) else id(token_counter)
        name = model.lower() if isinstance(model, str) and model.lower() in EMBEDDED_MODELS else model
        key = (name, dev, resolve_dtype(dtype, dev), counter_key, llmlingua2_model, options_key(model_options))
        with cls._shared_lock:
            engine = cls._shared.get(key)
        if engine is None:
            engine = cls(model, device, dtype, token_counter, llmlingua2_model=llmlingua2_model, **model_options)
            with cls._shared_lock:
                engine = cls._shared.setdefault(key, engine)
        return engine

    @property
    def device(self) -> str:
        return self._device

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def check_input_size(self, tokens: int) -> None:
        """Refuse a prompt above ``max_input_tokens`` with a message that says what to do."""
        if self.max_input_tokens is not None and tokens > self.max_input_tokens:
            raise ValueError(
                f"the prompt is {tokens:,} tokens, above this engine's max_input_tokens={self.max_input_tokens:,}: "
                "retrieve fewer or shorter documents (or split one huge document into passages and rank them "
                "first), or create the engine with a larger max_input_tokens (None: no limit) if the wait is fine")

    def session(self):
        """Context manager marking a call in progress (see :mod:`.serving`)."""
        scorer = self._scorer
        return scorer.session() if scorer is not None else contextlib.nullcontext()

    def start_workers(self, processes: int = 4) -> "CompressionEngine":
        """Run the Python of concurrent LLMLingua/LongLLMLingua calls in ``processes``
        worker processes; the model stays here and batches their device work.

        For a small LM on a GPU serving many callers at once: there, each call's own
        Python (tokenizing, ranking, ITPC bookkeeping) outweighs its device work, and
        threads run it one at a time (see :mod:`.workers`). Outputs are those of the
        calling thread's path. The first start in a process imports torch and transformers
        once (5-15 s), later workers fork from there in a fraction of a second each; start
        them once, at startup, inside ``if __name__ == "__main__":``. Returns the engine, so
        ``CompressionEngine.shared(...).start_workers(8)`` reads naturally.
        """
        with self._workers_lock:
            if self._workers is not None:
                raise RuntimeError("this engine already has host workers: stop_workers() first to change their number")
            self._workers = HostWorkers(self, processes)
        return self

    @property
    def host_workers(self) -> HostWorkers | None:
        """The running host workers (``start_workers``), or None."""
        return self._workers

    def stop_workers(self) -> None:
        """Stop the host workers (if any); calls then run in the calling thread again."""
        with self._workers_lock:
            workers, self._workers = self._workers, None
            if workers is not None:
                workers.close()

    # ------------------------------------------------------------------ public API
    @serving_session
    @host_offloaded
    def compress(
        self,
        context: str | Sequence[str],
        question: str = "",
        instruction: str = "",
        *,
        method: Method = "longllmlingua",
        rate: float = 0.5,
        target_token: float | None = None,
        use_context_level_filter: bool = True,
        use_token_level_filter: bool = True,
        context_budget: str = "+100",
        reorder_context: str | None = None,
        dynamic_context_compression_ratio: float | None = None,
        condition_compare: bool | None = None,
        iterative_size: int = 200,
        force_context_ids: Sequence[int] | None = None,
        force_context_number: int | None = None,
        structured: bool = False,
        force_tokens: Sequence[str] = (),
        force_reserve_digit: bool = False,
        drop_consecutive: bool = False,
        context_level_rate: float | None = None,
        chunk_end_tokens: Sequence[str] = (".", "\n"),
        return_words: bool = False,
        ranking: Ranking = "auto",
        granularity: Granularity = "word",
        evidence: bool | None = None,
        keep_names_and_numbers: bool = True,
    ) -> CompressionResult:
        """Compress ``context`` to ``rate`` of the prompt's target-LLM tokens (or to
        ``target_token`` tokens), keeping ``instruction`` and ``question`` whole.

        ``method="longllmlingua"`` (the default) ranks contexts by how well they predict
        ``question``, puts the best first, compresses better-ranked ones more gently and
        scores tokens contrastively; without a question it falls back to ``"llmlingua"``:
        perplexity ranking, original order, plain surprisal.
        ``structured=True`` honours ``<llmlingua, rate=..., compress=False>`` tags in
        the contexts; enable it only for text you wrote, never for retrieved documents.

        Where this goes beyond the papers (each can be switched back):

        * ``ranking``: with a question, ``"auto"`` fuses the small LM's question
          perplexity with BM25 (``"hybrid"``); ``"perplexity"`` is LongLLMLingua's own
          ranking, ``"bm25"`` lexical only. Without a question: perplexity (LLMLingua).
        * ``granularity="word"`` deletes whole words, numbers, URLs and dates, never
          parts of them; ``"token"`` deletes single small-LM tokens as the papers do.
        * ``evidence``: with a question and a budget too tight for whole documents,
          keep the documents' most question-relevant sentences before pruning tokens
          (``None``: when needed; ``False``: never).
        * ``keep_names_and_numbers``: words with a digit or a capital letter (names,
          numbers, dates, codes: what a reader copies) are the last a window gives up,
          within its budget. ``False`` ranks them by the LM's scores alone.
        """
        contexts = validate_contexts(context)
        validate_budget(rate, target_token)
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not supported here: use one of {METHODS}")
        for name, value in (("question", question), ("instruction", instruction)):
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        question, instruction = question or "", instruction or ""
        if iterative_size < 2:
            raise ValueError("iterative_size must be at least 2")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking {ranking!r} must be one of {RANKINGS}")
        if granularity not in ("word", "token"):
            raise ValueError(f"granularity {granularity!r} must be 'word' or 'token'")
        if force_context_ids is not None:
            bad = [i for i in force_context_ids if not isinstance(i, int) or not 0 <= i < len(contexts)]
            if bad:
                raise ValueError(f"force_context_ids {bad} are not indices of the {len(contexts)} contexts")

        question_aware = method in ("longllmlingua", "llmlingua2") and bool(question.strip())
        token_classification = method == "llmlingua2"
        if token_classification and structured:
            raise ValueError("structured=True applies to llmlingua/longllmlingua; llmlingua2 takes force_tokens instead")
        reorder_how = reorder_context or ("sort" if question_aware else "original")
        delta = dynamic_context_compression_ratio if dynamic_context_compression_ratio is not None else (0.3 if question_aware else 0.0)
        contrast = question_aware if condition_compare is None else (condition_compare and bool(question.strip()))
        classified: dict[int, Any] = {}

        # caller-marked spans: rates per span; tags are removed from the text
        span_lists = [parse_spans(c) for c in contexts] if structured else [None] * len(contexts)
        texts = ["".join(s.text for s in spans) if spans is not None else c for c, spans in zip(contexts, span_lists)]

        joined = SEPARATOR.join([instruction] + texts + [question]).strip()
        lengths = self.count.many(texts)
        # one document and nothing around it (e.g. LLMLingua-2 over a long text): counted once
        origin = lengths[0] if len(texts) == 1 and joined == texts[0] else self.count(joined)
        self.check_input_size(origin)

        fixed = self.count(instruction) + self.count(question)
        target = float(target_token) if target_token not in (None, -1) else rate * origin
        context_target = max(0.0, target - fixed)

        fine_texts, fine_lengths = texts, lengths  # what the fine step prunes (the evidence step may cut)

        # coarse: rank and select whole contexts
        candidates = [i for i, t in enumerate(texts) if t.strip()]
        ranks: dict[int, int] = {}
        scores: dict[int, float] = {}
        if len(candidates) > 1 and use_context_level_filter and token_classification and not question_aware:
            # LLMLingua-2's own context filter: contexts by mean word keep-probability
            found = self.classifier.classify([texts[i] for i in candidates], chunk_end_tokens)
            classified = dict(zip(candidates, found))
            by_prob = sorted(candidates, key=lambda i: -classified[i].mean_prob)
            keep_share = context_level_rate or (((target / origin if origin else 1.0) + 1) / 2
                                                if use_token_level_filter else target / max(origin, 1))
            used = list(force_context_ids or [])
            used += [i for i in by_prob[: max(1, math.ceil(min(1.0, keep_share) * len(candidates)))] if i not in used]
            ranks = {i: pos for pos, i in enumerate(by_prob)}
            scores = {i: classified[i].mean_prob for i in candidates}
            used_rank_order = [i for i in by_prob if i in used]
            used = bc.reorder(used, reorder_how)
        elif len(candidates) > 1 and use_context_level_filter:
            ranked = self._rank([texts[i] for i in candidates], question if question_aware else "", ranking)
            order_ranked = [candidates[r.index] for r in ranked]
            for pos, r in enumerate(ranked):
                ranks[candidates[r.index]] = pos
                scores[candidates[r.index]] = r.score
            budget = bc.apply_slack(context_target, context_budget) if context_target > 0 else 0.0
            used = bc.select_contexts(order_ranked, lengths, budget, force_context_ids, force_context_number)
            if context_target <= 0:
                used = list(force_context_ids or [])
            if (question_aware and evidence is not False and use_token_level_filter
                    and not structured and context_target > 0
                    and (evidence or context_target < EVIDENCE_RATE * sum(lengths[i] for i in used))):
                fine_texts, fine_lengths, used = self._evidence(question, texts, order_ranked,
                                                                context_target / EVIDENCE_RATE, force_context_ids)
            used_rank_order = list(used)
            used = bc.reorder(used, reorder_how)
        else:
            used_rank_order = list(candidates)
            used = list(candidates)
        offsets = bc.dynamic_ratios(len(used_rank_order), delta)
        delta_of = dict(zip(used_rank_order, offsets))

        compressed = {i: fine_texts[i] for i in used}
        words: dict[int, list] = {}
        if token_classification and used:
            compressed, words = self._token_classification(
                fine_texts, used, classified, delta_of, context_target if use_token_level_filter else None,
                sum(fine_lengths[i] for i in used), force_tokens, force_reserve_digit, drop_consecutive,
                chunk_end_tokens, keep_names_and_numbers, return_words)
        elif use_token_level_filter and used:
            compressed = self._fine(
                fine_texts, span_lists, used, delta_of, question if contrast else "", context_target, iterative_size,
                fine_lengths, granularity, keep_names_and_numbers,
            )
        label = method if question_aware or method != "longllmlingua" else "llmlingua"
        result = self._assemble(contexts, texts, lengths, compressed, used, ranks, scores, instruction, question,
                                origin, target, label)
        if return_words:
            for i, ws in words.items():
                result.contexts[i].words = ws
        return result

    def rank(self, context: Sequence[str], question: str = "", ranking: Ranking = "auto") -> list[Ranked]:
        """Rank ``context`` as the coarse step would, best first (``Ranked.index`` points
        into ``context``). Useful on its own as a re-ranker."""
        texts = validate_contexts(context)
        if ranking not in RANKINGS:
            raise ValueError(f"ranking {ranking!r} must be one of {RANKINGS}")
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        return self._rank(texts, question.strip() and question, ranking) if texts else []

    def clear_rankings(self) -> None:
        """Forget the memoised coarse rankings (the last 64 (documents, question, ranking)
        seen). A memo hit skips the ranking pass, so a caller that compresses the same
        retrieved set again at another rate pays for it once; a benchmark timing repeated
        identical calls clears it to time what a new retrieval costs."""
        with self._lazy:
            self._rankings.clear()
        workers = self._workers
        if workers is not None:
            workers.clear_rankings()

    def recover(self, original_prompt: str, compressed_prompt: str, response: str) -> str:
        """Map spans of an LLM ``response`` copied from ``compressed_prompt`` back to the
        text of ``original_prompt`` (restores names that token deletion mangled)."""
        for name, value in (("original_prompt", original_prompt), ("compressed_prompt", compressed_prompt), ("response", response)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
        return _recover(self.tokenizer, original_prompt, compressed_prompt, response)

    # ------------------------------------------------------------------ internals
    def _rank(self, texts: list[str], question: str, ranking: Ranking) -> list[Ranked]:
        """Coarse ranking, best first: the small LM's (question) perplexity, BM25, or both.

        ``"hybrid"`` re-ranks BM25's best candidates with the LM (the others cannot
        reach the top of the fusion anyway) and fuses the two rankings. Rankings are
        memoised per (texts, question, method), so asking again at another rate is cheap.
        """
        # JSON keeps item boundaries: texts that merely concatenate alike cannot collide
        key = hashlib.sha1(json.dumps([question, ranking, list(texts)]).encode()).hexdigest()
        with self._lazy:
            hit = self._rankings.get(key)
        if hit is not None:
            return hit
        if not question or ranking == "perplexity":
            ranked = rank_contexts(self.scorer, texts, question, "after" if question else "none")
        else:
            lexical = bm25_scores(question, texts)
            by_lexical = sorted(range(len(texts)), key=lambda i: -lexical[i])  # stable: ties keep input order
            if ranking == "bm25":
                ranked = [Ranked(i, lexical[i]) for i in by_lexical]
            else:
                shortlist = by_lexical[: min(RERANK_MAX, max(RERANK_DEPTH, (len(texts) + 1) // 2))]
                by_lm = [shortlist[r.index] for r in rank_contexts(self.scorer, [texts[i] for i in shortlist],
                                                                   question, "after")]
                ranked = fuse([by_lexical, by_lm], [LEXICAL_WEIGHT, 1.0])
        with self._lazy:
            self._rankings[key] = ranked
            while len(self._rankings) > 64:
                self._rankings.pop(next(iter(self._rankings)))
        return ranked

    def _evidence(self, question: str, texts: list[str], ranked: list[int], budget: float,
                  force_ids: Sequence[int] | None) -> tuple[list[str], list[int], list[int]]:
        """The evidence step: the most question-relevant sentences to ``budget`` tokens,
        from a pool of the best-ranked documents wider than whole-document selection
        would keep (forced contexts stay whole).
        Returns the texts and lengths the fine step works on, and the documents still used."""
        forced = list(force_ids or [])
        pool, pooled = [], 0
        for i in ranked:  # a wider pool than whole-document selection took
            if i in forced:
                continue
            pool.append(i)
            pooled += self.count(texts[i])
            if pooled >= 4 * budget and len(pool) >= 2:
                break
        chosen = select_evidence(question, texts, pool, budget - sum(self.count(texts[i]) for i in forced),
                                 self.count)
        fine_texts = list(texts)
        for i, t in chosen.items():
            fine_texts[i] = t
        kept = forced + [i for i in ranked if i in chosen and i not in forced]
        return fine_texts, [self.count(t) if i in chosen or i in forced else 0 for i, t in enumerate(fine_texts)], kept

    def _token_classification(self, texts, used, classified, delta_of, context_target, total, force_tokens,
                              force_digits, drop_consecutive, chunk_end_tokens, prefer_salient: bool = False,
                              return_words: bool = False) -> tuple[dict[int, str], dict]:
        """LLMLingua-2's fine step: keep each kept context's most probable words, at the
        context's rate (the budget's share, shifted by its rank's dynamic ratio)."""
        missing = [i for i in used if i not in classified]
        pending = self.classifier.submit([texts[i] for i in missing], chunk_end_tokens)
        classified = {**classified, **dict(zip(missing, pending.texts))}
        tau = 1.0 if context_target is None or not total else min(1.0, context_target / total)
        docs = [classified[i] for i in used]
        prepare(docs, force_tokens, force_digits)  # word work needs no probabilities: done while the encoder runs
        sizes = [count_distinct(ct.words, self.count) for ct in docs]
        pending.wait()
        select_words(docs, [bc.clamp_rate(tau, delta_of.get(i, 0.0)) for i in used], sizes, prefer_salient)
        if context_target is not None and total:
            # word sizes are counted word by word (a little more than the joined text's
            # tokens): the budget is scaled into the same units
            scale = sum(map(sum, sizes)) / total
            fit_total(docs, sizes, context_target * scale, prefer_salient, RATE_TOLERANCE)
        compressed = {i: ct.compressed(drop_consecutive) for i, ct in zip(used, docs)}
        words = {i: [(w, round(p, 4), k) for w, p, k in zip(ct.words, ct.probs.tolist(), ct.kept.tolist())]
                 for i, ct in zip(used, docs)} if return_words else {}
        return compressed, words

    def _fine(
        self,
        texts: list[str],
        span_lists: list,
        used: list[int],
        delta_of: dict[int, float],
        prefix: str,
        context_target: float,
        window: int,
        lengths: list[int],
        granularity: Granularity = "word",
        protect_salient: bool = True,
    ) -> dict[int, str]:
        """Token-level step (ITPC) over the kept contexts, then fit to the budget in
        whole units (words, or glyphs with ``granularity="token"``).
        ``lengths``: target-LLM tokens of each of ``texts`` (already counted)."""
        pieces = ([prefix] if prefix else []) + [texts[i] for i in used]
        layout = _Layout.build(self.tokenizer, pieces, granularity=granularity)
        first_ctx = 1 if prefix else 0
        owner_ctx = [used[o - first_ctx] if o >= first_ctx else -1 for o in layout.owner]
        start = next((p for p, o in enumerate(layout.owner) if o >= first_ctx), len(layout.ids)) if prefix else 0

        n_small = sum(1 for o in owner_ctx if o >= 0)
        kept_target_tokens = sum(lengths[i] for i in used)
        small_per_target = n_small / kept_target_tokens if kept_target_tokens else 1.0
        tau = min(1.0, context_target * small_per_target / n_small) if n_small else 1.0

        token_rates, force = [], []
        char_rates = self._span_rates(layout, span_lists, used, first_ctx)
        for p, o in enumerate(owner_ctx):
            if p < start or o < 0:
                token_rates.append(1.0)
                force.append(True)
                continue
            r = char_rates[p]
            # only the caller's compress=False spans are untouchable; a document whose
            # dynamic rate reaches 1.0 is still trimmed if the budget demands it
            force.append(r is not None and r >= 1.0)
            if r is None:
                r = bc.clamp_rate(tau, delta_of.get(o, 0.0))
            token_rates.append(r)
        plan = bc.exact_plan(token_rates[start:], window)
        salient = salient_units(layout.text, layout.offsets, layout.unit) if protect_salient else set()
        priority = [layout.unit[p] in salient and owner_ctx[p] >= 0 for p in range(len(layout.ids))]
        result = iterative_compress(
            self.scorer, layout.ids, plan, start=start, contrastive=bool(prefix), window=window,
            force_keep=torch.tensor(force), priority=torch.tensor(priority, dtype=torch.bool),
        )
        kept = self._fit_budget(layout, owner_ctx, set(result.kept.tolist()), result.scores, force, context_target,
                                used, salient)
        pruned = self._decode(layout, owner_ctx, kept, used)
        # deleting pieces of a word can leave a fragment that the target LLM's tokenizer splits into
        # more tokens than the whole ("0 Cylinder" is 2 cl100k tokens, "0 Cyl" 3): such a context is
        # kept whole, which costs less and loses nothing
        for i in used:
            if pruned[i] and self.count(pruned[i]) > lengths[i]:
                pruned[i] = texts[i].strip()
        return pruned

    def _span_rates(self, layout: _Layout, span_lists: list, used: list[int], first_ctx: int) -> list[float | None]:
        """Per token: the rate of the caller-marked span it falls in (None: the call's)."""
        rates: list[float | None] = [None] * len(layout.ids)
        if all(span_lists[i] is None for i in used):
            return rates
        # character ranges of each span within the layout text
        ranges: list[tuple[int, int, float | None]] = []
        for k, i in enumerate(used):
            spans = span_lists[i]
            if spans is None:
                continue
            pos = layout.piece_chars[k + first_ctx][0]
            for s in spans:
                rate = 1.0 if not s.compress else s.rate
                ranges.append((pos, pos + len(s.text), rate))
                pos += len(s.text)
        for p, (s, e) in enumerate(layout.offsets):
            for rs, re_, rate in ranges:
                if s < re_ and e > rs and rate is not None:
                    rates[p] = rate if rates[p] is None else max(rates[p], rate)
        return rates

    def _fit_budget(self, layout: _Layout, owner_ctx: list[int], kept: set[int], scores: torch.Tensor,
                    force: list[bool], context_target: float, used: list[int], salient: set[int] = frozenset()
                    ) -> np.ndarray:
        """Turn ITPC's kept tokens into kept units, then nudge them until the contexts'
        target-LLM tokens are within ``RATE_TOLERANCE`` of the budget: drop the
        lowest-scored kept units or restore the highest-scored dropped ones. A unit
        scores as its best token (a word matters if any piece of it is informative).
        A few rounds suffice (at most 8): each round re-measures. Returns a kept flag per unit."""
        unit = np.asarray(layout.unit, dtype=np.int64)
        owner = np.asarray(owner_ctx, dtype=np.int64)
        n_units = int(unit.max()) + 1 if len(unit) else 0
        in_ctx = owner >= 0
        members = np.bincount(unit[in_ctx], minlength=n_units)  # context tokens per unit
        values = scores.numpy().astype(np.float64)[in_ctx]
        known = ~np.isnan(values)
        score = np.full(n_units, -np.inf)
        np.maximum.at(score, unit[in_ctx][known], values[known])
        score[np.bincount(unit[in_ctx][known], minlength=n_units) == 0] = np.nan  # never scored
        if salient:
            score[list(salient)] += 1e6
        forced = np.bincount(unit[in_ctx], weights=np.asarray(force, dtype=np.float64)[in_ctx], minlength=n_units) > 0
        kept_units = forced.copy()
        kept_units[unit[sorted(kept)]] = True
        kept_units[unit[~in_ctx]] = True
        if not members.any() or context_target <= 0:
            return kept_units
        for _ in range(8):
            texts = self._decode(layout, owner_ctx, kept_units, used)
            achieved = sum(self.count(t) for t in texts.values() if t)
            if achieved and abs(achieved - context_target) <= RATE_TOLERANCE * context_target:
                break
            per = int(members[kept_units].sum()) / achieved if achieved else 1.0
            change = (context_target - achieved) * per  # small-LM tokens to add (+) or remove (-)
            if change < 0:
                pool = np.flatnonzero((members > 0) & kept_units & ~forced & ~np.isnan(score))
                pool = pool[np.argsort(score[pool], kind="stable")]
            else:
                pool = np.flatnonzero((members > 0) & ~kept_units & ~np.isnan(score))
                pool = pool[np.argsort(-score[pool], kind="stable")]
            # move units, best candidates first, until |change| small-LM tokens have moved
            k = min(len(pool), int(np.searchsorted(np.cumsum(members[pool]), abs(change), side="left")) + 1)
            if change == 0 or k == 0:
                break
            kept_units[pool[:k]] = change > 0
        return kept_units

    def _decode(self, layout: _Layout, owner_ctx: list[int], kept_units: np.ndarray, used: list[int]) -> dict[int, str]:
        """Per-context text of the tokens of the kept units."""
        owner = np.asarray(owner_ctx, dtype=np.int64)
        ids = np.asarray(layout.ids, dtype=np.int64)
        keep = (owner >= 0) & kept_units[np.asarray(layout.unit, dtype=np.int64)] if len(ids) else owner >= 0
        return {i: self.scorer.decode(ids[keep & (owner == i)].tolist()).strip() for i in used}

    def _assemble(self, contexts, texts, lengths, compressed, used, ranks, scores, instruction, question,
                  origin, target, method) -> CompressionResult:
        order = [i for i in used if compressed.get(i, "").strip()]
        prompt = SEPARATOR.join([p for p in [instruction, *[compressed[i] for i in order], question] if p])
        results = []
        for i in range(len(contexts)):
            text = compressed.get(i, "") if i in order else ""
            results.append(ContextResult(
                index=i, kept=i in order, rank=ranks.get(i), text=text, origin_tokens=lengths[i],
                compressed_tokens=self.count(text), score=scores.get(i),
            ))
        return CompressionResult(
            compressed_prompt=prompt, origin_tokens=origin, compressed_tokens=self.count(prompt), method=method,
            contexts=results, order=order, instruction=instruction, question=question, target_tokens=target,
        )
