"""Prompt compression (LLMLingua, LongLLMLingua) for LangChain and LlamaIndex on one shared engine.

Start with :class:`CompressionEngine` (framework-free), the drop-in
:class:`PromptCompressor` (same calls as ``llmlingua.PromptCompressor``), or the
adapters in :mod:`lingua_integrations.langchain` and :mod:`lingua_integrations.llama_index`.
"""

from .engine import CompressionEngine, CompressionResult, ContextResult
from .models import DEFAULT_MODEL, EMBEDDED_MODELS, ModelRegistry
from .tokens import TokenCounter

__version__ = "0.1.0"


def __getattr__(name: str):
    # the drop-in class pulls in its reference-faithful flow only when asked for
    if name == "PromptCompressor":
        from .compat import PromptCompressor

        return PromptCompressor
    raise AttributeError(name)


__all__ = [
    "CompressionEngine", "CompressionResult", "ContextResult", "PromptCompressor",
    "TokenCounter", "ModelRegistry", "DEFAULT_MODEL", "EMBEDDED_MODELS", "__version__",
]
