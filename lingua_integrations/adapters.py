"""What the framework adapters share: typed settings and one call into the engine.

The LangChain and LlamaIndex classes inherit :class:`LinguaSettings` (pydantic fields
named like the peer packages' so migrating is a rename) and call
:func:`compress_texts`; no algorithm lives in an adapter.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine import CompressionEngine, CompressionResult
from .models import DEFAULT_MODEL

# options an adapter sets itself; passing them through additional_compress_kwargs would
# bypass validation or let retrieved text carry compression tags
_RESERVED = {"context", "question", "instruction", "method", "rate", "target_token", "structured", "ranking",
             "granularity", "evidence"}


class LinguaSettings(BaseModel):
    """Configuration shared by every adapter (validated on construction)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(DEFAULT_MODEL, description="small LM: embedded alias, local HF directory or hub id")
    device_map: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'")
    dtype: str = Field("auto", description="'auto' (fp32 on CPU; fp16 LM, bf16 classifier on GPU), 'float32', 'float16', 'bfloat16'")
    model_configuration: dict[str, Any] = Field(default_factory=dict,
                                                description="extra from_pretrained kwargs (trust_remote_code, ...)")
    method: Literal["longllmlingua", "llmlingua", "llmlingua2"] = Field(
        "longllmlingua", description="longllmlingua: question-aware (falls back to llmlingua without a query); "
                                     "llmlingua2: token classification (llmlingua2_model, by default the offline distilled MiniLM)")
    rank_method: Literal["longllmlingua", "llmlingua"] | None = Field(
        None, description="peer-compatible alias of method; if given, it sets method")
    llmlingua2_model: str | None = Field(
        None, description="token-classification model for method='llmlingua2' (hub id or local directory); "
                          "ranking by question still uses model_name")
    rate: float = Field(0.5, gt=0.0, le=1.0, description="share of target-LLM tokens to keep")
    target_token: int | None = Field(None, gt=0, description="absolute budget in target-LLM tokens (overrides rate)")
    instruction: str = Field("", description="kept whole and counted in the budget")
    ranking: Literal["auto", "hybrid", "perplexity", "bm25"] = Field(
        "auto", description="document ranking with a query: auto/hybrid fuses the small LM with BM25; "
                            "'perplexity' is LongLLMLingua's own")
    granularity: Literal["word", "token"] = Field(
        "word", description="delete whole words (numbers, URLs, dates intact) or single tokens as the papers do")
    evidence: bool | None = Field(
        None, description="keep the most query-relevant sentences when whole documents exceed the budget "
                          "(None: when needed, False: never)")
    token_counter: str = Field("cl100k_base", description="tiktoken encoding that counts target-LLM tokens")
    additional_compress_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="other CompressionEngine.compress options (context_budget, ...)")

    @field_validator("additional_compress_kwargs")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = _RESERVED & set(value)
        if clash:
            raise ValueError(f"set {sorted(clash)} with the class's own fields, not additional_compress_kwargs")
        return value

    @model_validator(mode="after")
    def _rank_method_sets_method(self) -> "LinguaSettings":
        if self.rank_method is not None and self.method != "llmlingua2":
            self.method = self.rank_method
        return self

    def engine(self) -> CompressionEngine:
        """The shared engine for these settings (one loaded model per process)."""
        return CompressionEngine.shared(self.model_name, self.device_map, self.dtype, self.token_counter,
                                        llmlingua2_model=self.llmlingua2_model, **self.model_configuration)

    def compress_texts(self, texts: Sequence[str], query: str | None, **overrides: Any) -> CompressionResult:
        """Compress ``texts`` for ``query`` with these settings (tags never parsed)."""
        options = {**self.additional_compress_kwargs, **overrides}
        return self.engine().compress(
            list(texts), question=query or "", instruction=self.instruction, method=options.pop("method", self.method),
            rate=options.pop("rate", self.rate), target_token=options.pop("target_token", self.target_token),
            ranking=options.pop("ranking", self.ranking), granularity=options.pop("granularity", self.granularity),
            evidence=options.pop("evidence", self.evidence), structured=False, **options,
        )


def lingua_metadata(result: CompressionResult, index: int) -> dict[str, Any]:
    """The ``lingua`` entry an adapter attaches to each returned document or node."""
    c = result.contexts[index]
    return {
        "index": index, "rank": c.rank, "kept": c.kept, "origin_tokens": c.origin_tokens,
        "compressed_tokens": c.compressed_tokens, "method": result.method,
    }


def output_order(result: CompressionResult, order: str, include_dropped: bool) -> list[int]:
    """Indices to return: by relevance (prompt order) or as given; dropped ones last if asked."""
    if order not in ("relevance", "input"):
        raise ValueError(f"order {order!r} must be 'relevance' or 'input'")
    kept = list(result.kept_indices) if order == "relevance" else sorted(result.kept_indices)
    if include_dropped:
        kept += [i for i in range(len(result.contexts)) if i not in set(result.kept_indices)]
    return kept

