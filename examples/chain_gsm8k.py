"""LCEL chain middleware compressing few-shot chain-of-thought demonstrations (GSM8K).

The LLMLingua paper's setting: an 8-shot chain-of-thought prompt made of the GSM8K
training solutions with the most reasoning lines. ``LinguaPromptCompressor`` budgets
the demonstrations with LLMLingua's controller (perplexity ranking, whole
demonstrations first, then token pruning) before the prompt template; the question is
kept whole. Prints tokens before and after, how many numbers survived, and the answer.

usage: python examples/chain_gsm8k.py [--rate 0.3] [--questions 1]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from lingua_integrations.langchain import LinguaPromptCompressor
from local_models import local_chat_llm

SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.json"
PROMPT = PromptTemplate.from_template("{demonstrations}\n\nQuestion: {question}\nLet's think step by step.\n")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.3)
    ap.add_argument("--questions", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    data = json.loads(SAMPLE.read_text())
    demos = [f"Question: {d['question']}\nLet's think step by step.\n{d['answer']}" for d in data["demonstrations"]]
    compressor = LinguaPromptCompressor(rate=args.rate, device_map=args.device)
    chain = compressor | PROMPT | local_chat_llm() | StrOutputParser()

    for item in data["questions"][: args.questions]:
        inputs = {"context": [], "question": item["question"], "demonstrations": demos}
        compressed = compressor.invoke(inputs)
        stats = compressed["lingua"]["demonstrations"]
        numbers_before = len(NUMBER.findall("\n\n".join(demos)))
        numbers_after = len(NUMBER.findall(compressed["demonstrations"]))
        print(f"=== {item['question']}")
        print(f"demonstrations: {stats['origin_tokens']} -> {stats['compressed_tokens']} tokens "
              f"({stats['compressed_tokens'] / stats['origin_tokens']:.2f}), kept {len(stats['kept_indices'])}/8 "
              f"demonstrations, numbers kept {numbers_after}/{numbers_before}")
        print("compressed demonstrations (start):", compressed["demonstrations"][:400].replace("\n", " | "))
        print(f"answer (SmolLM2-135M-Instruct): {chain.invoke(inputs)[:300]}")
        print(f"gold: {item['answer'].split('####')[-1].strip()}\n")


if __name__ == "__main__":
    main()
