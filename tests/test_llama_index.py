"""LlamaIndex postprocessor with the real framework: a vector index over NQ passages with
local MiniLM embeddings, its retriever and a query engine."""

from __future__ import annotations

import asyncio
import sys

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers.no_text import NoText
from llama_index.core.schema import NodeRelationship, QueryBundle, RelatedNodeInfo, TextNode
from conftest import ROOT
from lingua_integrations.llama_index import LinguaNodePostprocessor

sys.path.insert(0, str(ROOT / "examples"))
from local_models import minilm_embedding  # noqa: E402  (the examples' offline embedding model)


@pytest.fixture(scope="module")
def index(nq_rows):
    nodes = []
    for i, r in enumerate(nq_rows[:120]):
        node = TextNode(text=r["text"], id_=f"nq-{i}", metadata={"title": r["title"], "row": i},
                        excluded_llm_metadata_keys=["row"])
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc-{i}")
        nodes.append(node)
    return VectorStoreIndex(nodes, embed_model=minilm_embedding())


def test_postprocessor_keeps_node_identity(index, nq_rows, engine):
    question = nq_rows[5]["question"]
    retrieved = index.as_retriever(similarity_top_k=8).retrieve(question)
    before = {n.node.node_id: (n.node.get_content(), dict(n.node.metadata)) for n in retrieved}
    post = LinguaNodePostprocessor(rate=0.33, device_map="cpu")
    out = post.postprocess_nodes(retrieved, query_bundle=QueryBundle(question))
    assert out and len(out) <= len(retrieved)
    scores = {n.node.node_id: n.score for n in retrieved}
    for n in out:
        original_text, original_meta = before[n.node.node_id]
        assert n.score == scores[n.node.node_id]
        assert n.node.metadata == original_meta
        assert n.node.excluded_llm_metadata_keys == ["row"]
        assert n.node.relationships[NodeRelationship.SOURCE].node_id == n.node.node_id.replace("nq-", "doc-")
        assert len(n.node.get_content()) <= len(original_text)
    # something was pruned (the best-ranked node may keep every word: LongLLMLingua's
    # dynamic ratio gives it the gentlest rate)
    assert any(len(n.node.get_content()) < len(before[n.node.node_id][0]) for n in out)
    # the retrieved (docstore) nodes were not mutated
    assert all(n.node.get_content() == before[n.node.node_id][0] for n in retrieved)
    assert post.engine() is engine  # the one shared engine (and its host workers, if started)
    total = sum(post.engine().count(t) for t, _ in before.values())
    assert sum(post.engine().count(n.node.get_content()) for n in out) <= 0.33 * 1.15 * total + 30


def test_query_engine_and_async_path(index, nq_rows):
    question = nq_rows[7]["question"]
    post = LinguaNodePostprocessor(rate=0.4, device_map="cpu", annotate=True, order="input")
    # NoText returns the (postprocessed) source nodes and never calls its LLM;
    # get_response_synthesizer("no_text") would ignore llm= and look for OpenAI
    synthesizer = NoText(llm=MockLLM())
    qe = RetrieverQueryEngine(retriever=index.as_retriever(similarity_top_k=6), response_synthesizer=synthesizer,
                              node_postprocessors=[post])
    response = qe.query(question)
    assert response.source_nodes
    ranks = [n.node.metadata["lingua"]["index"] for n in response.source_nodes]
    assert ranks == sorted(ranks)  # order="input"
    assert "lingua" in response.source_nodes[0].node.excluded_llm_metadata_keys
    retrieved = index.as_retriever(similarity_top_k=6).retrieve(question)
    out = asyncio.run(post.apostprocess_nodes(retrieved, query_str=question))
    assert [n.node.node_id for n in out] == [n.node.node_id for n in response.source_nodes]


def test_without_query_and_bad_input():
    post = LinguaNodePostprocessor(rate=0.5, device_map="cpu")
    assert post.postprocess_nodes([]) == []
    node = TextNode(text="The Danube flows through ten countries, more than any other river in the world.")
    from llama_index.core.schema import NodeWithScore

    out = post.postprocess_nodes([NodeWithScore(node=node, score=1.0)])
    assert out[0].node.node_id == node.node_id
    with pytest.raises(TypeError, match="NodeWithScore"):
        post.postprocess_nodes([node])
