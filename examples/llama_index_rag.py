"""LlamaIndex RAG with compression: VectorStoreIndex (local MiniLM) -> LinguaNodePostprocessor -> local LLM.

A vector index over real Natural Questions passages (bundled sample) with local
all-MiniLM-L6-v2 embeddings; its query engine retrieves, our postprocessor compresses
the nodes (keeping their ids, metadata and scores), and a local SmolLM2-135M-Instruct
answers. Prints tokens before and after, the kept nodes, and the answer.

usage: python examples/llama_index_rag.py [--rate 0.33] [--questions 2] [--top-k 10]
"""

from __future__ import annotations

import argparse

from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.schema import TextNode

from lingua_integrations.evaluation import contains_answer
from lingua_integrations.llama_index import LinguaNodePostprocessor
from local_models import minilm_embedding, nq_sample, smollm2_llama_index_llm



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    cases, passages = nq_sample()
    nodes = [TextNode(text=text, id_=f"p{i}", metadata={"title": title}) for i, (title, text) in enumerate(passages)]
    Settings.llm = smollm2_llama_index_llm()
    index = VectorStoreIndex(nodes, embed_model=minilm_embedding())
    post = LinguaNodePostprocessor(rate=args.rate, device_map=args.device, annotate=True)
    query_engine = index.as_query_engine(similarity_top_k=args.top_k, node_postprocessors=[post])
    count = post.engine().count

    for case in cases[: args.questions]:
        q = case["question"] + "?"
        raw = index.as_retriever(similarity_top_k=args.top_k).retrieve(q)
        response = query_engine.query(q)
        before = sum(count(n.node.get_content()) for n in raw)
        after = sum(count(n.node.get_content()) for n in response.source_nodes)
        print(f"=== {q}  (gold: {case['answers'][0]})")
        print(f"retrieved {len(raw)} nodes, {before} tokens -> {len(response.source_nodes)} nodes, {after} tokens "
              f"({after / before:.2f} of the original)")
        print("kept (best first):", ", ".join(f"{n.node.node_id} {n.node.metadata['title']} (score {n.score:.2f})"
                                              for n in response.source_nodes))
        print(f"gold answer in the compressed context: "
              f"{contains_answer(' '.join(n.node.get_content() for n in response.source_nodes), case['answers'])}")
        print(f"answer (SmolLM2-135M-Instruct): {str(response).strip()[:300]}\n")


if __name__ == "__main__":
    main()
