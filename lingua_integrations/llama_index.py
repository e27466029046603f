"""LlamaIndex adapter: a node postprocessor for query engines and retrievers.

Unlike the peer package (which joins node texts and re-splits them, losing ids,
metadata, relationships and scores), each output node here *is* the input node's
identity: a copy with the same id, metadata, relationships and excluded-metadata keys,
whose text is the compressed text, wrapped with the input score.

>>> engine = index.as_query_engine(node_postprocessors=[LinguaNodePostprocessor(rate=0.33)])
"""

from __future__ import annotations

import asyncio
from typing import List, Literal, Optional

from pydantic import Field

try:
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as exc:  # pragma: no cover - depends on the user's install
    raise ImportError("lingua_integrations.llama_index needs llama-index-core: "
                      "pip install 'lingua-integrations[llama-index]'") from exc

from .adapters import LinguaSettings, lingua_metadata, output_order


class LinguaNodePostprocessor(LinguaSettings, BaseNodePostprocessor):
    """Compress retrieved nodes (LongLLMLingua when a query is given, LLMLingua otherwise).

    Only the node's text is compressed (``MetadataMode.NONE``); metadata is left to
    LlamaIndex's own formatting. Compression statistics go in ``node.metadata["lingua"]``
    only when ``annotate`` is set, since metadata may be embedded or shown to the LLM.
    """

    order: Literal["relevance", "input"] = Field(
        "relevance", description="'relevance': best first (LongLLMLingua's reordering); 'input': as retrieved")
    include_dropped: bool = Field(False, description="also return dropped nodes (empty text, last)")
    annotate: bool = Field(False, description="add a 'lingua' entry (rank, token counts) to each node's metadata, "
                                              "excluded from what the LLM and the embedder see")

    @classmethod
    def class_name(cls) -> str:
        return "LinguaNodePostprocessor"

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        nodes = list(nodes)
        for i, n in enumerate(nodes):
            if not isinstance(n, NodeWithScore):
                raise TypeError(f"nodes[{i}] is {type(n).__name__}, not a NodeWithScore")
        if not nodes:
            return []
        query = query_bundle.query_str if query_bundle is not None else None
        result = self.compress_texts([n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes], query)
        out = []
        for i in output_order(result, self.order, self.include_dropped):
            original = nodes[i].node
            node = original.model_copy(deep=False)
            node.metadata = dict(original.metadata)  # a copy: never mutate what the docstore holds
            node.set_content(result.contexts[i].text)
            if self.annotate:
                node.metadata["lingua"] = lingua_metadata(result, i)
                node.excluded_llm_metadata_keys = [*original.excluded_llm_metadata_keys, "lingua"]
                node.excluded_embed_metadata_keys = [*original.excluded_embed_metadata_keys, "lingua"]
            out.append(NodeWithScore(node=node, score=nodes[i].score))
        return out

    async def _apostprocess_nodes(self, nodes: List[NodeWithScore],
                                  query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._postprocess_nodes, nodes, query_bundle)


__all__ = ["LinguaNodePostprocessor"]
