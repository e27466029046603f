"""LLMLingua-2 on CPU: ours (drop-in PromptCompressor) vs the reference, same run, same inputs.

Input: the dev NQ passages joined by blank lines to ~33k cl100k tokens, rate 0.33,
``force_tokens=["\\n", "?"]``. Two encoder shapes, both with the real MiniLM WordPiece
tokenizer: the MiniLM encoder itself (6x384, a seeded keep/drop head) and a 1-layer,
64-wide encoder, which shows the cost of everything *but* the encoder. The reference runs
in its own environment (transformers 4.46) as a subprocess; each side is timed as the
median of 3 calls after a warm-up, plus our encoder forward passes alone.

usage: python benchmarks/llmlingua2_cpu.py [--docs 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lingua_integrations import PromptCompressor  # noqa: E402
from lingua_integrations.evaluation.nq import build_minilm_token_classifier, load_rows, minilm_dir  # noqa: E402
from lingua_integrations.evaluation.reference import subprocess_env  # noqa: E402

REF_TIMER = r'''
import json, statistics, sys, time
from llmlingua import PromptCompressor
pc = PromptCompressor(model_name=sys.argv[1], device_map="cpu", use_llmlingua2=True)
text = open(sys.argv[2]).read()
kw = dict(rate=0.33, force_tokens=["\n", "?"])
pc.compress_prompt([text], **kw)
ts = []
for _ in range(3):
    t = time.perf_counter(); r = pc.compress_prompt([text], **kw); ts.append(time.perf_counter() - t)
print(json.dumps({"median": statistics.median(ts), "origin": r["origin_tokens"], "compressed": r["compressed_tokens"]}))
'''


def tiny_classifier(out: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    BertForTokenClassification(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=128, num_labels=2)).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/nq-open-oracle-dev.jsonl.gz"))
    ap.add_argument("--reference-env", default=str(ROOT / ".cache/reference-env"))
    args = ap.parse_args()
    text = "\n\n".join(r["text"] for r in load_rows(args.data)[: args.docs])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "input.txt").write_text(text)
        (tmp / "timer.py").write_text(REF_TIMER)
        env = subprocess_env(Path(args.reference_env), tmp)
        shapes = {
            "MiniLM-L6 (6x384)": build_minilm_token_classifier(tmp / "bert-base-multilingual-cased-minilm"),
            "tiny (1x64)": tiny_classifier(tmp / "bert-base-multilingual-cased-tiny"),
        }
        for name, path in shapes.items():
            pc = PromptCompressor(model_name=str(path), device_map="cpu", use_llmlingua2=True)
            kw = dict(rate=0.33, force_tokens=["\n", "?"])
            pc.compress_prompt([text], **kw)
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                ours = pc.compress_prompt([text], **kw)
                ts.append(time.perf_counter() - t)
            clf = pc.engine.classifier
            t = time.perf_counter()
            clf.classify([text])  # encoder + word grouping
            classify_s = time.perf_counter() - t
            proc = subprocess.run([sys.executable, str(tmp / "timer.py"), str(path), str(tmp / "input.txt")],
                                  capture_output=True, text=True, env=env)
            ref = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
            if ref is None:
                print(proc.stderr[-2000:], file=sys.stderr)
            rows.append({"shape": name, "origin_tokens": ours["origin_tokens"], "ours_s": statistics.median(ts),
                         "ours_classify_s": classify_s, "ours_rate": ours["compressed_tokens"] / ours["origin_tokens"],
                         "reference_s": ref and ref["median"],
                         "reference_rate": ref and ref["compressed"] / ref["origin"]})
    print(f"\nLLMLingua-2 on this machine's CPU ({os.cpu_count()} cores, torch {torch.__version__}), "
          f"{rows[0]['origin_tokens']} cl100k tokens, rate 0.33, median of 3\n")
    print("| encoder shape | ours s | of which classify (encoder + words) s | reference s | speed-up | "
          "ours rate | reference rate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['reference_s'] / r['ours_s']:.1f}x" if r["reference_s"] else "n/a"
        ref_s = f"{r['reference_s']:.2f}" if r["reference_s"] else "n/a"
        ref_rate = f"{r['reference_rate']:.3f}" if r["reference_rate"] else "n/a"
        print(f"| {r['shape']} | {r['ours_s']:.2f} | {r['ours_classify_s']:.2f} | {ref_s} | {speed} | "
              f"{r['ours_rate']:.3f} | {ref_rate} |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "llmlingua2_cpu.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
