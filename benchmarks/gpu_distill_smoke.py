"""Distillation's training step on a GPU (bf16 autocast): a BERT-base-shaped encoder with
random weights and the MiniLM tokenizer learns a deletion rule from 300 NQ passages.

    python3 benchmarks/gpu_distill_smoke.py    (on the GPU machine, carrying .cache/gpu)
"""
import gzip
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_integrations import CompressionEngine  # noqa: E402
from lingua_integrations.distill import TrainConfig, annotate, filter_annotations, train_compressor  # noqa: E402

STOP = {"the", "a", "an", "of", "in", "on", "and", "to", "is", "was", "for", "by", "with", "as", "at", "its", "it"}


def main() -> None:
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    assets = ROOT / ".cache" / "gpu"
    rows = [json.loads(line) for line in gzip.open(assets / "data" / "nq-open-oracle-dev.jsonl.gz", "rt")]
    base = Path("/tmp/bert-base-shape")
    BertForTokenClassification(BertConfig(num_labels=2)).save_pretrained(base)
    AutoTokenizer.from_pretrained(assets / "minilm").save_pretrained(base)
    texts = [r["text"] for r in rows[:300]]
    teacher = [" ".join(w for w in t.split() if w.lower().strip(".,;:()") not in STOP) for t in texts]
    samples, report = filter_annotations([annotate(t, c) for t, c in zip(texts, teacher)])
    t = time.perf_counter()
    result = train_compressor(samples, str(base), "/tmp/student", TrainConfig(epochs=4, learning_rate=5e-5,
                                                                               device="cuda"), progress=True)
    seconds = time.perf_counter() - t
    engine = CompressionEngine(device="cuda", llmlingua2_model=result.out_dir)
    out = engine.compress([rows[500]["text"]], method="llmlingua2", rate=0.5)
    best = result.history[result.best_epoch - 1]
    print(json.dumps({"device": torch.cuda.get_device_name(0), "samples": report.kept, "train_seconds": seconds,
                      "best": best, "compressed": out.compressed_prompt[:200]}, indent=1))


if __name__ == "__main__":
    main()
