"""Rebuild gsm8k_sample.json: the 8-shot chain-of-thought prompt of the LLMLingua paper's
GSM8K setting (the 8 training solutions with the most reasoning lines) and 5 questions.

usage: python examples/data/make_gsm8k_sample.py ../shared/data/gsm8k-train.jsonl.gz
"""
import gzip
import json
import random
import sys
from pathlib import Path

rows = [json.loads(line) for line in gzip.open(sys.argv[1], "rt", encoding="utf-8")]
ranked = sorted(range(len(rows)), key=lambda i: (-rows[i]["answer"].count("\n"), i))
demos = [rows[i] for i in ranked[:8]]
rest = [i for i in range(len(rows)) if i not in set(ranked[:8])]
questions = [rows[i] for i in random.Random(0).sample(rest, 5)]
out = Path(__file__).with_name("gsm8k_sample.json")
out.write_text(json.dumps({"demonstrations": demos, "questions": questions}, indent=1))
print("wrote", out)
