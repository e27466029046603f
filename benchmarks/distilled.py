"""The distilled default LLMLingua-2 model against its SmolLM2 teacher, in one run (issue 7).

NQ multi-document cases of the quality harness (20 documents, gold at a seeded
position), questions drawn from rows 0-599 (the model was distilled from passages of
rows 600-999), rates 0.33 and 0.2, CPU, float32:

    python benchmarks/distilled.py [--cases 12] [--seed 1]

Writes benchmarks/results/distilled.{json,md}.
"""
import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_integrations import CompressionEngine  # noqa: E402
from lingua_integrations.evaluation.nq import build_cases, load_rows  # noqa: E402
from lingua_integrations.evaluation.quality import run_nq  # noqa: E402

METHODS = ["ours llmlingua2 (distilled)", "ours default", "ours llmlingua"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS), help="first = the student (quick checks: only it)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nq-open-oracle-dev.jsonl.gz"))
    args = ap.parse_args()
    rows = load_rows(args.data)
    questions = random.Random(args.seed).sample(range(600), args.cases)
    cases = build_cases(rows, args.cases, seed=args.seed, question_rows=questions)
    engine = CompressionEngine.shared(device="cpu", dtype="float32")
    engine.compress(["warm-up text."], method="llmlingua2", rate=0.5)  # load (and merge) the distilled model
    methods = [m for m in args.methods.split(",") if m]
    samples = run_nq(cases, [0.33, 0.2], methods, engine, progress=lambda s: print(s, flush=True))
    table = []
    for method in methods:
        for rate in (0.33, 0.2):
            got = [s for s in samples if s.method == method and s.rate == rate]
            table.append({"method": method, "rate": rate, "answer_kept": statistics.mean(s.answer_kept for s in got),
                          "achieved": statistics.mean(s.achieved for s in got),
                          "seconds": statistics.median(s.seconds for s in got)})
    lines = ["| method | rate | answer kept | achieved rate | median s per call |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['rate']} | {r['answer_kept']:.2f} | {r['achieved']:.3f} | {r['seconds']:.2f} |"
              for r in table]
    student = {r["rate"]: r for r in table if r["method"] == methods[0]}
    for teacher in methods[1:]:
        for r in (r for r in table if r["method"] == teacher):
            lines.append(f"\n{teacher} at {r['rate']}: student/teacher answer kept {student[r['rate']]['answer_kept']:.2f}"
                         f"/{r['answer_kept']:.2f}, speed-up {r['seconds'] / student[r['rate']]['seconds']:.1f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distilled.md").write_text(f"{args.cases} cases, seed {args.seed}\n\n" + "\n".join(lines) + "\n")
    (out / "distilled.json").write_text(json.dumps({"cases": args.cases, "seed": args.seed, "table": table}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
