"""LangChain adapters: a document compressor for retrievers and a Runnable for LCEL chains.

Both are thin: they turn LangChain objects into texts, call the shared engine through
:class:`~lingua_integrations.adapters.LinguaSettings`, and turn the result back.
Every instance with the same model shares one loaded model.

>>> from langchain_classic.retrievers import ContextualCompressionRetriever  # or langchain.retrievers
>>> retriever = ContextualCompressionRetriever(base_compressor=LinguaDocumentCompressor(rate=0.33),
...                                            base_retriever=bm25)
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Optional, Sequence

from pydantic import Field

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.runnables import RunnableConfig, RunnableSerializable
except ImportError as exc:  # pragma: no cover - depends on the user's install
    raise ImportError("lingua_integrations.langchain needs langchain-core: pip install 'lingua-integrations[langchain]'") from exc

from .adapters import LinguaSettings, lingua_metadata, output_order
from .engine import validate_contexts


class LinguaDocumentCompressor(LinguaSettings, BaseDocumentCompressor):
    """Compress retrieved documents for a query (LongLLMLingua on the embedded model by default).

    Drop-in for ``ContextualCompressionRetriever`` and ``DocumentCompressorPipeline``.
    Returned documents carry the original metadata, untouched, plus a ``lingua`` entry
    (``index`` in the input, ``rank``, ``kept``, ``origin_tokens``, ``compressed_tokens``).
    Documents dropped by coarse selection are omitted unless ``include_dropped``; those
    then come last with empty ``page_content`` and ``lingua["kept"] == False``.
    """

    order: Literal["relevance", "input"] = Field(
        "relevance", description="'relevance': best first (LongLLMLingua's reordering); 'input': as retrieved")
    include_dropped: bool = Field(False, description="also return dropped documents (empty, flagged)")

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        docs = list(documents)
        for i, d in enumerate(docs):
            if not isinstance(d, Document):
                raise TypeError(f"documents[{i}] is {type(d).__name__}, not a langchain Document")
        if not docs:
            return []
        result = self.compress_texts([d.page_content for d in docs], query)
        out = []
        for i in output_order(result, self.order, self.include_dropped):
            original = docs[i]
            metadata = {**original.metadata, "lingua": lingua_metadata(result, i)}
            out.append(Document(page_content=result.contexts[i].text, metadata=metadata, id=original.id))
        return out

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Optional[Callbacks] = None) -> Sequence[Document]:
        # the engine call runs in a worker thread: the event loop stays free, and
        # concurrent calls meet in the shared engine
        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks)


def _texts(value: Any, field: str) -> list[str]:
    """A string, a list of strings or a list of Documents, as texts."""
    if isinstance(value, Document):
        return [value.page_content]
    if isinstance(value, (list, tuple)):
        return [v.page_content if isinstance(v, Document) else v for v in value] if value else []
    return validate_contexts(value, field)


class LinguaPromptCompressor(LinguaSettings, RunnableSerializable[dict, dict]):
    """LCEL middleware: compress the parts of a prompt's inputs before the template.

    Input: a dict with ``context`` (a string, strings or ``Document``s), ``question``,
    optional ``instruction`` and ``demonstrations`` (few-shot examples). Output: the same
    dict with ``context`` (and ``demonstrations``) replaced by compressed strings joined
    by blank lines, plus ``lingua`` with token counts (visible in traces)::

        chain = ({"context": retriever, "question": RunnablePassthrough()}
                 | LinguaPromptCompressor(rate=0.33) | prompt | llm)

    Contexts are compressed question-aware (LongLLMLingua); demonstrations by LLMLingua's
    budget controller (perplexity ranking, original order), each to ``rate``.
    """

    context_key: str = Field("context", description="input key holding the retrieved context")
    question_key: str = Field("question", description="input key holding the question")

    def invoke(self, input: dict, config: Optional[RunnableConfig] = None, **kwargs: Any) -> dict:
        return self._call_with_config(self._compress, input, config, run_type="chain", **kwargs)

    async def ainvoke(self, input: dict, config: Optional[RunnableConfig] = None, **kwargs: Any) -> dict:
        return await self._acall_with_config(self._acompress, input, config, run_type="chain", **kwargs)

    async def _acompress(self, input: dict) -> dict:
        return await asyncio.to_thread(self._compress, input)

    def _compress(self, input: dict) -> dict:
        if not isinstance(input, dict):
            raise TypeError(f"LinguaPromptCompressor takes a dict with '{self.context_key}' and "
                            f"'{self.question_key}', got {type(input).__name__}")
        if self.context_key not in input:
            raise ValueError(f"input has no '{self.context_key}' key (keys: {sorted(input)})")
        question = input.get(self.question_key) or ""
        if not isinstance(question, str):
            raise TypeError(f"'{self.question_key}' must be a string, got {type(question).__name__}")
        if input.get("instruction") is not None and not isinstance(input["instruction"], str):
            raise TypeError("'instruction' must be a string")
        out = dict(input)
        stats: dict[str, Any] = {}
        contexts = _texts(input[self.context_key], self.context_key)
        result = self.compress_texts(contexts, question) if contexts else None
        if result is not None:
            out[self.context_key] = "\n\n".join(result.contexts[i].text for i in result.kept_indices)
            stats["context"] = _stats(result)
        else:
            out[self.context_key] = ""
        demos = _texts(input.get("demonstrations"), "demonstrations") if input.get("demonstrations") else []
        if demos:
            d = self.compress_texts(demos, None, method="llmlingua")
            out["demonstrations"] = "\n\n".join(d.contexts[i].text for i in d.kept_indices)
            stats["demonstrations"] = _stats(d)
        parts = list(stats.values())
        stats["origin_tokens"] = sum(p["origin_tokens"] for p in parts)
        stats["compressed_tokens"] = sum(p["compressed_tokens"] for p in parts)
        out["lingua"] = stats
        return out


def _stats(result) -> dict[str, Any]:
    return {
        "origin_tokens": sum(c.origin_tokens for c in result.contexts),
        "compressed_tokens": sum(c.compressed_tokens for c in result.contexts),
        "kept_indices": result.kept_indices, "dropped_indices": result.dropped_indices, "method": result.method,
    }


__all__ = ["LinguaDocumentCompressor", "LinguaPromptCompressor"]
