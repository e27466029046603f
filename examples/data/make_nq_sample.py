"""Rebuild nq_cases_sample.jsonl.gz: a few 20-document NQ cases for the demo.

usage: python examples/data/make_nq_sample.py ../shared/data/nq-open-oracle-dev.jsonl.gz
"""
import gzip
import json
import sys
from dataclasses import asdict
from pathlib import Path

from lingua_integrations.evaluation import build_cases, load_rows

rows = load_rows(sys.argv[1])
cases = build_cases(rows, n_cases=4, n_docs=20, seed=2026)
out = Path(__file__).with_name("nq_cases_sample.jsonl.gz")
with gzip.open(out, "wt", encoding="utf-8") as f:
    for case in cases:
        f.write(json.dumps(asdict(case), ensure_ascii=False) + "\n")
print("wrote", out, len(cases), "cases")
