"""LangChain RAG with compression: BM25 retriever -> LinguaDocumentCompressor -> local LLM.

A BM25 retriever over real Natural Questions passages (bundled sample), wrapped in a
ContextualCompressionRetriever whose compressor is ours (LongLLMLingua on the embedded
SmolLM2-135M), feeding an LCEL chain that answers with a local SmolLM2-135M-Instruct.
Prints tokens before and after compression, what was kept, and the answer.

usage: python examples/langchain_rag.py [--rate 0.33] [--questions 2] [--k 10]
"""

from __future__ import annotations

import argparse
import time

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_community.retrievers import BM25Retriever
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnablePassthrough

from lingua_integrations.evaluation import contains_answer
from lingua_integrations.langchain import LinguaDocumentCompressor
from local_models import local_chat_llm, nq_sample

PROMPT = PromptTemplate.from_template(
    "Answer the question using the documents. Reply with a short answer.\n\n{context}\n\nQuestion: {question}?\nAnswer:")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.33)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--k", type=int, default=10, help="documents BM25 retrieves")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    cases, passages = nq_sample()
    corpus = [Document(page_content=text, metadata={"title": title}, id=f"p{i}") for i, (title, text) in enumerate(passages)]
    bm25 = BM25Retriever.from_documents(corpus, k=args.k)
    compressor = LinguaDocumentCompressor(rate=args.rate, device_map=args.device)
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=bm25)
    count = compressor.engine().count
    chain = ({"context": retriever | (lambda docs: "\n\n".join(d.page_content for d in docs)),
              "question": RunnablePassthrough()} | PROMPT | local_chat_llm() | StrOutputParser())
    print(f"corpus: {len(corpus)} NQ passages; BM25 k={args.k}; compressor {compressor.model_name} "
          f"on {compressor.engine().device}\n")

    for case in cases[: args.questions]:
        q = case["question"]
        raw = bm25.invoke(q)
        t = time.perf_counter()
        docs = retriever.invoke(q)
        seconds = time.perf_counter() - t
        before = sum(count(d.page_content) for d in raw)
        after = sum(d.metadata["lingua"]["compressed_tokens"] for d in docs)
        print(f"=== {q}?  (gold: {case['answers'][0]})")
        print(f"retrieved {len(raw)} docs, {before} tokens -> kept {len(docs)} docs, {after} tokens "
              f"({after / before:.2f} of the original) in {seconds:.1f}s")
        print("kept (best first):", ", ".join(f"{d.metadata['title']} [{d.metadata['lingua']['compressed_tokens']}/"
                                              f"{d.metadata['lingua']['origin_tokens']}]" for d in docs))
        compressed = "\n\n".join(d.page_content for d in docs)
        print(f"gold answer in the uncompressed / compressed context: "
              f"{contains_answer(' '.join(d.page_content for d in raw), case['answers'])} / "
              f"{contains_answer(compressed, case['answers'])}")
        print(f"answer (SmolLM2-135M-Instruct): {chain.invoke(q)}\n")


if __name__ == "__main__":
    main()
