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
is not trusted unless ``model_config={"trust_remote_code": True}``; sentence-level
filtering, ``keep_split`` and the third-party rankers (bm25, openai, cohere, ...) raise
a ``ValueError`` instead of silently doing something else.
"""

from __future__ import annotations

from typing import Any, Sequence


from . import budget as bc
from .engine import SEPARATOR, CompressionEngine, _Layout, validate_contexts
from .itpc import iterative_compress
from .models import DEFAULT_MODEL
from .ranking import rank_contexts
from .structured import parse_spans

_LLMLINGUA2_ONLY = {
    "target_context", "context_level_rate", "context_level_target_token", "return_word_label", "word_sep",
    "label_sep", "token_to_word", "force_tokens", "force_reserve_digit", "drop_consecutive", "chunk_end_tokens",
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
        if use_llmlingua2:
            raise ValueError(
                "use_llmlingua2=True is not available in this version of lingua-integrations yet; "
                "use the causal-LM methods (rank_method='llmlingua' or 'longllmlingua')."
            )
        config = dict(model_config or {})
        trust_remote_code = bool(config.pop("trust_remote_code", False))
        dtype = config.pop("torch_dtype", config.pop("dtype", "auto"))
        config.pop("pad_to_left", None)
        self.model_name = model_name
        self.engine = CompressionEngine.shared(
            model_name, _device_from_map(device_map), dtype, "cl100k_base", trust_remote_code=trust_remote_code, **config
        )
        self.scorer = self.engine.scorer
        self.tokenizer = self.engine.tokenizer
        self.model = self.engine.loaded.model
        self.device = self.engine.device
        self.max_position_embeddings = self.engine.loaded.max_positions
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
        lengths = [self.get_token_length(c) for c in contexts]
        fixed_instruction, fixed_question = self.get_token_length(instruction), self.get_token_length(question)
        if target_token == -1:
            target_token = (fixed_instruction + fixed_question + sum(lengths)) * rate - fixed_instruction - (
                fixed_question if concate_question else 0)

        spans = _spans
        if len(contexts) > 1 and use_context_level_filter:
            ranked = [r.index for r in rank_contexts(self.scorer, contexts, question, condition)]
            budget = bc.apply_slack(target_token if target_token >= 0 else 100, context_budget)
            forced = list(force_context_ids or [])
            if spans is not None and strict_preserve_uncompressed:
                forced += [i for i, sp in enumerate(spans) if any(not s.compress for s in sp) and i not in forced]
            taken = bc.select_contexts(ranked, lengths, budget, forced, force_context_number)
            used = bc.reorder(taken, reorder_context)
            offset_of = dict(zip(taken, bc.dynamic_ratios(len(taken), dynamic_context_compression_ratio)))
            deltas = [offset_of[i] for i in used]
            contexts = [contexts[i] for i in used]
            spans = [spans[i] for i in used] if spans is not None else None
        else:
            deltas = [0.0] * len(contexts)

        if use_token_level_filter:
            prefix = (question + SEPARATOR + instruction if add_instruction else question) if conditioned else None
            compressed = self._iterative(contexts, prefix, target_token, iterative_size, deltas, condition_compare,
                                         spans, rate)
        else:
            compressed = SEPARATOR.join(contexts)

        parts = [instruction] if instruction else []
        if compressed.strip():
            parts.append(compressed)
        if question and concate_question:
            parts.append(question)
        prompt = SEPARATOR.join(parts)
        compressed_tokens = self.oai_count(prompt)
        saving = (origin_tokens - compressed_tokens) * 0.06 / 1000
        ratio = 1 if compressed_tokens == 0 else origin_tokens / compressed_tokens
        return {
            "compressed_prompt": prompt,
            "origin_tokens": origin_tokens,
            "compressed_tokens": compressed_tokens,
            "ratio": f"{ratio:.1f}x",
            "rate": f"{100 / ratio:.1f}%",
            "saving": f", Saving ${saving:.1f} in GPT-4.",
        }

    def _iterative(self, contexts: list[str], prefix: str | None, target_token: float, window: int,
                   deltas: list[float], contrastive: bool, spans: list | None, default_rate: float) -> str:
        pieces = ([prefix] if prefix is not None else []) + contexts
        layout = _Layout.build(self.tokenizer, pieces)
        start = 0
        if prefix is not None:
            start = next((p for p, o in enumerate(layout.owner) if o >= 1), len(layout.ids))
        if spans is None:
            estimated = [self.get_token_length(c, add_special_tokens=False) + 2 for c in contexts]
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
