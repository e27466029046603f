"""Drop-in replacement for ``llmlingua.PromptCompressor`` (version 0.2.2).

Migrating is an import change::

    - from llmlingua import PromptCompressor
    + from lingua_integrations import PromptCompressor

The constructor takes ``model_name``, ``device_map`` and ``model_config``;
``compress_prompt`` takes the reference's keyword arguments and returns its keys
(``compressed_prompt``, ``origin_tokens``, ``compressed_tokens``, ``ratio``, ``rate``,
``saving``). It reproduces the reference's behaviour, including how it spends the budget
(in small-LM tokens, with its estimated window plan), so results match it; it runs on
transformers 5.x and shares the loaded model with every other compressor in the
process. For budgets that the output actually meets, use
:meth:`CompressionEngine.compress` (the *default mode*), which the framework adapters
and the CLI use.

Differences, on purpose: the default model is the embedded ``"smollm2-135m"`` (the
reference defaults to a 7B hub model); ``device_map="auto"`` is accepted; remote code
is not trusted unless ``model_config={"trust_remote_code": True}``; LLMLingua-2 word
boundaries come from the tokenizer, not from the model's name; sentence-level
filtering, ``keep_split`` and the third-party rankers (bm25, openai, cohere, ...) raise
a ``ValueError`` instead of silently doing something else.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Any, Sequence

import numpy as np

from . import budget as bc
from .engine import SEPARATOR, CompressionEngine, _Layout, serving_session, validate_contexts
from .itpc import iterative_compress
from .models import DEFAULT_MODEL
from .ranking import rank_contexts
from .structured import parse_spans
from .token_classification import ClassifiedText, count_distinct, prepare


def _reference_sizes(ct: ClassifiedText, count, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Each word *as the model sees it* (its sub-tokens joined: lower-cased by uncased
    tokenizers; an object array) and its target-LLM tokens, as the reference counts them.
    Needs no probabilities, so it runs while the encoder does.

    Worked out once per distinct sub-token sequence: words of up to three sub-tokens (nearly
    all) are grouped by a packed integer key in numpy, and a key's view and size are
    remembered across calls; longer words and inserted line breaks (their own text) go one
    by one."""
    ids, lo = ct.token_ids, ct.tok_lo
    lengths = ct.tok_hi - lo
    short = (lengths >= 1) & (lengths <= 3)
    if len(ids) and int(ids.max()) + 1 > _KEY_MASK:
        short[:] = False
    views = np.empty(len(ct), dtype=object)
    sizes = np.zeros(len(ct), dtype=np.int64)
    if short.any():
        key = np.zeros(int(short.sum()), dtype=np.int64)
        s_lo, s_len = lo[short], lengths[short]
        for j in range(3):
            token = np.where(s_len > j, ids[np.minimum(s_lo + j, len(ids) - 1)] + 1, 0)
            key |= token << (_KEY_BITS * j)
        keys, inverse = np.unique(key, return_inverse=True)
        known = [_packed_view_size(tokenizer, count, k) for k in keys.tolist()]
        views[short] = np.array([v for v, _ in known], dtype=object)[inverse.ravel()]
        sizes[short] = np.array([n for _, n in known], dtype=np.int64)[inverse.ravel()]
    rest = np.flatnonzero(~short)
    if len(rest):
        words = ct.words
        views[rest] = [words[k] if n == 0 else _model_view(tokenizer, tuple(ids[a : a + n].tolist()))
                       for k, a, n in zip(rest.tolist(), lo[rest].tolist(), lengths[rest].tolist())]
        sizes[rest] = count_distinct(views[rest].tolist(), count, space=1)
    return views, sizes


def _reference_select(ct: ClassifiedText, reduce_rate: float, views: tuple[np.ndarray, np.ndarray] | None,
                      drop_consecutive: bool) -> None:
    """The reference's word choice, window by window: a word stays when its probability
    (1.0 if forced) is above the window's percentile ``100 * reduce_rate + 1`` of the word
    probabilities repeated once per target-LLM token of the word (``views``: from
    :func:`_reference_sizes`)."""
    if reduce_rate <= 0 or views is None:
        ct.kept = np.ones(len(ct), dtype=bool)
        return
    probs = np.where(ct.forced, 1.0, ct.probs)
    texts, sizes = views
    _, window = np.unique(ct.chunks, return_inverse=True)
    window = window.ravel()
    if drop_consecutive:  # a forced word repeating the previous forced word, with no kept word between, goes
        cut = _window_percentiles(probs, np.ones(len(probs), dtype=np.int64), window, int(100 * reduce_rate))[window]
        between, prev, current = False, None, -1
        for k in np.argsort(window, kind="stable").tolist():
            if window[k] != current:  # each window starts afresh
                between, prev, current = False, None, window[k]
            if ct.forced[k]:
                if between:
                    between = False
                elif texts[k] == prev:
                    probs[k] = 0.0
                prev = texts[k]
            else:
                between |= bool(probs[k] > cut[k])
    cut = _window_percentiles(probs, sizes, window, int(100 * reduce_rate + 1))[window]
    ct.kept = (probs > cut) | ((cut == 1.0) & (probs == 1.0))


def _window_percentiles(values: np.ndarray, repeats: np.ndarray, window: np.ndarray, percent: int) -> np.ndarray:
    """Per window ``w``: ``np.percentile(np.repeat(values[window == w], repeats[...]), percent)``
    (numpy's default linear method, same arithmetic) for all windows at once, without
    building the repeated arrays. ``window``: 0..W-1 per value; ``repeats`` >= 1."""
    order = np.lexsort((values, window))
    v = values[order]
    cum = np.cumsum(repeats[order])
    n = np.bincount(window, weights=repeats).astype(np.int64)  # repeated values per window
    before = np.concatenate([[0], np.cumsum(n)[:-1]])  # repeated values in the windows before
    index = (n - 1) * np.true_divide(percent, 100)
    lower = np.floor(index)
    gamma = index - lower
    lower = np.minimum(lower.astype(np.int64), n - 1)
    upper = np.minimum(lower + 1, n - 1)
    a = v[np.searchsorted(cum, before + lower, side="right")]
    b = v[np.searchsorted(cum, before + upper, side="right")]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


_KEY_BITS = 21  # a word of up to three sub-tokens packs into one int64 key: each id + 1 in 21 bits
_KEY_MASK = (1 << _KEY_BITS) - 1


@functools.lru_cache(maxsize=1 << 17)
def _packed_view_size(tokenizer, count, key: int) -> tuple[str, int]:
    """The model view and target-LLM size (as :func:`count_distinct` gives it) of the word
    whose sub-tokens ``key`` packs (see :func:`_reference_sizes`)."""
    ids = []
    while key:
        ids.append((key & _KEY_MASK) - 1)
        key >>= _KEY_BITS
    view = _model_view(tokenizer, tuple(ids))
    return view, int(count_distinct([view], count, space=1)[0])


@functools.lru_cache(maxsize=65536)
def _model_view(tokenizer, ids: tuple[int, ...]) -> str:
    """A word as the model sees it (sub-tokens joined; lower-cased by uncased tokenizers)."""
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(ids)))


# counts the input's target-LLM tokens while the encoder runs (tiktoken releases the GIL)
_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="lingua-count")

_LLMLINGUA2_ONLY = {
    "target_context", "context_level_rate", "context_level_target_token", "return_word_label", "word_sep",
    "label_sep", "token_to_word", "force_tokens", "force_reserve_digit", "drop_consecutive", "chunk_end_tokens",
}


def _result(prompt: str, origin: int, compressed: int, **extra: Any) -> dict:
    """The reference's result keys and their formats."""
    ratio = 1 if compressed == 0 else origin / compressed
    return {
        "compressed_prompt": prompt, **extra, "origin_tokens": origin, "compressed_tokens": compressed,
        "ratio": f"{ratio:.1f}x", "rate": f"{100 / ratio:.1f}%",
        "saving": f", Saving ${(origin - compressed) * 0.06 / 1000:.1f} in GPT-4.",
    }


def _device_from_map(device_map: str | None) -> str:
    if device_map is None:
        return "auto"
    if any(key in device_map for key in ("cuda", "cpu", "mps")) or device_map == "auto":
        return device_map
    return "auto"  # 'balanced', 'sequential', ...: one device is what a 7B-or-smaller scorer needs


class PromptCompressor:
    """``llmlingua.PromptCompressor`` with the same calls and results (see module doc)."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        device_map: str = "auto",
        model_config: dict | None = None,
        open_api_config: dict | None = None,
        use_llmlingua2: bool = False,
        llmlingua2_config: dict | None = None,
    ) -> None:
        config = dict(model_config or {})
        trust_remote_code = bool(config.pop("trust_remote_code", False))
        dtype = config.pop("torch_dtype", config.pop("dtype", "auto"))
        config.pop("pad_to_left", None)
        self.model_name = model_name
        self.use_llmlingua2 = use_llmlingua2
        self.llmlingua2_config = dict(llmlingua2_config or {})
        device = _device_from_map(device_map)
        if use_llmlingua2:  # model_name is the token classifier; no causal LM is loaded
            self.engine = CompressionEngine.shared(DEFAULT_MODEL, device, dtype, "cl100k_base",
                                                   llmlingua2_model=model_name, trust_remote_code=trust_remote_code,
                                                   **config)
            loaded = self.engine.classifier.loaded
        else:
            self.engine = CompressionEngine.shared(model_name, device, dtype, "cl100k_base",
                                                   trust_remote_code=trust_remote_code, **config)
            self.scorer = self.engine.scorer
            loaded = self.engine.loaded
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.device = loaded.device
        self.max_position_embeddings = loaded.max_positions
        self.oai_count = self.engine.count

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return self.compress_prompt(*args, **kwargs)

    def get_token_length(self, text: str, add_special_tokens: bool = True, use_oai_tokenizer: bool = False) -> int:
        if use_oai_tokenizer:
            return self.oai_count(text)
        return self.scorer.count(text, special=add_special_tokens)

    def recover(self, original_prompt: str, compressed_prompt: str, response: str) -> str:
        return self.engine.recover(original_prompt, compressed_prompt, response)

    # ------------------------------------------------------------------
    def structured_compress_prompt(self, context: Sequence[str], instruction: str = "", question: str = "",
                                   rate: float = 0.5, target_token: float = -1, **kwargs: Any) -> dict:
        """Compress contexts whose spans carry ``<llmlingua, rate=..., compress=...>`` tags."""
        contexts = validate_contexts(context) or [" "]
        spans = [parse_spans(c) for c in contexts]
        texts = ["".join(s.text for s in sp) for sp in spans]
        if target_token != -1:
            total = sum(self.get_token_length(t) for t in texts)
            rate = target_token / total if total else 1.0
        return self.compress_prompt(texts, instruction, question, rate, target_token, _spans=spans, **kwargs)

    @serving_session
    def compress_prompt(
        self,
        context: str | Sequence[str],
        instruction: str = "",
        question: str = "",
        rate: float = 0.5,
        target_token: float = -1,
        iterative_size: int = 200,
        force_context_ids: Sequence[int] | None = None,
        force_context_number: int | None = None,
        use_sentence_level_filter: bool = False,
        use_context_level_filter: bool = True,
        use_token_level_filter: bool = True,
        keep_split: bool = False,
        keep_first_sentence: int = 0,
        keep_last_sentence: int = 0,
        keep_sentence_number: int = 0,
        high_priority_bonus: int = 100,
        context_budget: str = "+100",
        token_budget_ratio: float = 1.4,
        condition_in_question: str = "none",
        reorder_context: str = "original",
        dynamic_context_compression_ratio: float = 0.0,
        condition_compare: bool = False,
        add_instruction: bool = False,
        rank_method: str = "llmlingua",
        concate_question: bool = True,
        strict_preserve_uncompressed: bool = True,
        _spans: list | None = None,
        **llmlingua2_kwargs: Any,
    ) -> dict:
        """Compress like ``llmlingua.PromptCompressor.compress_prompt`` 0.2.2."""
        unknown = set(llmlingua2_kwargs) - _LLMLINGUA2_ONLY
        if unknown:
            raise TypeError(f"compress_prompt() got unexpected keyword arguments {sorted(unknown)}")
        if target_token is None or (target_token != -1 and target_token <= 0):
            raise ValueError(f"target_token must be positive, or -1 to use rate (got {target_token!r})")
        if self.use_llmlingua2:
            return self.compress_prompt_llmlingua2(
                context, rate=rate, target_token=target_token, use_context_level_filter=use_context_level_filter,
                use_token_level_filter=use_token_level_filter, force_context_ids=force_context_ids, **llmlingua2_kwargs)
        if use_sentence_level_filter or keep_split:
            raise ValueError("use_sentence_level_filter and keep_split are not supported; leave them False")
        if rank_method not in ("llmlingua", "longllmlingua"):
            raise ValueError(f"rank_method {rank_method!r} is not supported: use 'llmlingua' or 'longllmlingua'")
        if rate is None or not 0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        contexts = validate_contexts(context) or [" "]
        question, instruction = question or "", instruction or ""
        if rank_method == "longllmlingua" and not question:
            raise ValueError("rank_method='longllmlingua' needs a question")

        if condition_compare and "_condition" not in condition_in_question:
            condition_in_question += "_condition"
        if rank_method == "longllmlingua":
            if condition_in_question == "none":
                condition_in_question = "after"
        else:
            condition_in_question = "none_condition" if "_condition" in condition_in_question else "none"
        conditioned = "_condition" in condition_in_question
        condition = condition_in_question.replace("_condition", "")

        origin_tokens = self.oai_count(SEPARATOR.join([instruction] + contexts + [question]).strip())
        self.engine.check_input_size(origin_tokens)
        *context_ids, instruction_ids, question_ids = self.scorer.encode_many([*contexts, instruction, question],
                                                                             special=True)
        lengths = [len(ids) for ids in context_ids]
        fixed_instruction, fixed_question = len(instruction_ids), len(question_ids)
        if target_token == -1:
            target_token = (fixed_instruction + fixed_question + sum(lengths)) * rate - fixed_instruction - (
                fixed_question if concate_question else 0)

        spans = _spans
        if len(contexts) > 1 and use_context_level_filter:
            ranked = [r.index for r in rank_contexts(self.scorer, contexts, question, condition, context_ids)]
            budget = bc.apply_slack(target_token if target_token >= 0 else 100, context_budget)
            forced = list(force_context_ids or [])
            if spans is not None and strict_preserve_uncompressed:
                forced += [i for i, sp in enumerate(spans) if any(not s.compress for s in sp) and i not in forced]
            taken = bc.select_contexts(ranked, lengths, budget, forced, force_context_number)
            used = bc.reorder(taken, reorder_context)
            offset_of = dict(zip(taken, bc.dynamic_ratios(len(taken), dynamic_context_compression_ratio)))
            deltas = [offset_of[i] for i in used]
            contexts = [contexts[i] for i in used]
            lengths = [lengths[i] for i in used]
            spans = [spans[i] for i in used] if spans is not None else None
        else:
            deltas = [0.0] * len(contexts)

        if use_token_level_filter:
            prefix = (question + SEPARATOR + instruction if add_instruction else question) if conditioned else None
            # the reference's plan estimates each context as its tokens without special tokens, plus two
            special = self.tokenizer.num_special_tokens_to_add()
            plain = [n - special + 2 for n in lengths]
            compressed = self._iterative(contexts, prefix, target_token, iterative_size, deltas, condition_compare,
                                         spans, rate, plain)
        else:
            compressed = SEPARATOR.join(contexts)

        parts = [instruction] if instruction else []
        if compressed.strip():
            parts.append(compressed)
        if question and concate_question:
            parts.append(question)
        prompt = SEPARATOR.join(parts)
        return _result(prompt, origin_tokens, self.oai_count(prompt))

    def compress_prompt_llmlingua2(
        self,
        context: str | Sequence[str],
        rate: float = 0.5,
        target_token: float = -1,
        use_context_level_filter: bool = False,
        use_token_level_filter: bool = True,
        target_context: int = -1,
        context_level_rate: float = 1.0,
        context_level_target_token: int = -1,
        force_context_ids: Sequence[int] | None = None,
        return_word_label: bool = False,
        word_sep: str = "\t\t|\t\t",
        label_sep: str = " ",
        token_to_word: str = "mean",
        force_tokens: Sequence[str] = (),
        force_reserve_digit: bool = False,
        drop_consecutive: bool = False,
        chunk_end_tokens: Sequence[str] = (".", "\n"),
    ) -> dict:
        """LLMLingua-2 like the reference: per encoder window, keep the words whose keep
        probability is above the window's ``1 - rate`` percentile (weighted by target
        tokens); optionally filter whole contexts first by mean word probability."""
        if not self.use_llmlingua2:
            raise ValueError("compress_prompt_llmlingua2 needs PromptCompressor(..., use_llmlingua2=True)")
        if token_to_word != "mean":
            raise ValueError("token_to_word must be 'mean' (the paper's word probability)")
        contexts = validate_contexts(context) or [" "]
        if rate is None or not 0 < rate <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        count = self.oai_count
        origin_counted = _BACKGROUND.submit(lambda: sum(count(c) for c in contexts))  # meanwhile, the encoder
        if sum(len(c.encode("utf-8", "surrogatepass")) for c in contexts) > (self.engine.max_input_tokens or math.inf):
            # a token is at least one byte: only input with more bytes than the limit can be too long
            self.engine.check_input_size(origin_counted.result())
        pending = self.engine.classifier.submit(contexts, chunk_end_tokens)
        docs = pending.texts  # while the encoder runs: force words, count them as the reference does
        prepare(docs, force_tokens, force_reserve_digit)
        views = [_reference_sizes(ct, count, self.tokenizer) for ct in docs] if use_token_level_filter else []
        pending.wait()
        origin = origin_counted.result()
        self.engine.check_input_size(origin)
        keep = list(range(len(contexts)))
        if use_context_level_filter and len(contexts) > 1:
            if target_context <= 0 and context_level_rate >= 1.0 and context_level_target_token <= 0:
                if target_token < 0 and rate < 1.0:
                    context_level_rate = (rate + 1.0) / 2 if use_token_level_filter else rate
                if target_token >= 0:
                    context_level_target_token = target_token * 2 if use_token_level_filter else target_token
            if target_context >= 0:
                context_level_rate = min(target_context / len(contexts), 1.0)
            if context_level_target_token >= 0:
                context_level_rate = min(context_level_target_token / origin, 1.0)
            means = [float(ct.probs.sum()) / max(1, len(ct)) for ct in docs]
            cut = float(np.percentile(means, int(100 * (1 - context_level_rate))))
            keep = [i for i, m in enumerate(means) if m >= cut or (force_context_ids and i in force_context_ids)]
            if target_token >= 0:
                rate = min(target_token / max(1, sum(count(contexts[i]) for i in keep)), 1.0)
        elif target_token > 0:
            rate = min(target_token / origin, 1.0)
        reduce = max(0.0, 1 - rate) if use_token_level_filter else 0.0
        for i in keep:
            _reference_select(docs[i], reduce, views[i] if views else None, drop_consecutive)
        compressed = [docs[i].compressed(drop_consecutive) for i in keep]
        prompt = SEPARATOR.join(compressed)
        res = _result(prompt, origin, sum(count(c) for c in compressed), compressed_prompt_list=compressed)
        if return_word_label:
            res["fn_labeled_original_prompt"] = word_sep.join(
                f"{w}{label_sep}{int(k)}" for i, ct in enumerate(docs) for w, k in zip(ct.words, ct.kept.tolist())
                if i in keep or not k)
        return res

    def _iterative(self, contexts: list[str], prefix: str | None, target_token: float, window: int,
                   deltas: list[float], contrastive: bool, spans: list | None, default_rate: float,
                   estimated: list[int]) -> str:
        pieces = ([prefix] if prefix is not None else []) + contexts
        layout = _Layout.build(self.tokenizer, pieces)
        start = 0
        if prefix is not None:
            start = next((p for p, o in enumerate(layout.owner) if o >= 1), len(layout.ids))
        if spans is None:
            tau = target_token / (sum(estimated) + 1)
            plan = bc.reference_plan(estimated, tau, deltas, window)
        else:
            plan = bc.exact_plan(self._span_token_rates(layout, spans, 1 if prefix is not None else 0, default_rate)[start:], window)
        result = iterative_compress(self.scorer, layout.ids, plan, start=start, contrastive=contrastive,
                                    reference=True, window=window)
        kept = [layout.ids[p] for p in result.kept.tolist() if p >= start]
        return self.scorer.decode(kept).replace("<s> ", "").replace("<s>", "")

    @staticmethod
    def _span_token_rates(layout: _Layout, spans: list, first: int, default_rate: float) -> list[float]:
        """Rate of every token from the tagged span it starts in (separators: 1.0)."""
        ranges = []
        for k, sp in enumerate(spans):
            pos = layout.piece_chars[k + first][0]
            for s in sp:
                ranges.append((pos, pos + len(s.text), 1.0 if not s.compress else (s.rate if s.rate is not None else default_rate)))
                pos += len(s.text)
        rates = []
        for s, _ in layout.offsets:
            rate = 1.0
            for rs, re_, r in ranges:
                if rs <= s < re_:
                    rate = r
                    break
            rates.append(rate)
        return rates
