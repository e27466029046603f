"""Every case of lingua_integrations.evaluation.robustness at every entry point: what each
gets, as the table in docs/reliability.md (results/robustness.{md,json}).

    python benchmarks/robustness.py [--all] [--only=CASE ...]
    # --all: also the cases that take many minutes on 2 CPU cores; --only: rerun these
    # cases and keep the others' results from the last run
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_integrations.evaluation.robustness import CASES, ENTRY_POINTS, Outcome, run  # noqa: E402


def cell(o) -> str:
    if o.kind == "result":
        extra = "" if o.documents_in is None else f", {o.documents_accounted}/{o.documents_in} docs accounted"
        budget = "" if o.within_budget is None else (", within budget" if o.within_budget else ", OVER BUDGET")
        return f"result ({o.detail}{extra}{budget}; {o.seconds:.1f} s)"
    if o.kind == "skipped":
        return f"not run here: {o.detail}"
    mark = "" if o.acceptable else "**DEFECT** "
    return f"{mark}{o.kind}: {o.detail.replace('|', '/')}"


def main() -> None:
    run_all = "--all" in sys.argv
    only = {a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")}  # rerun these cases, keep the rest
    results = {}
    previous = ROOT / "benchmarks" / "results" / "robustness.json"
    if only and previous.is_file():
        for r in json.loads(previous.read_text()):
            key = (r.pop("case"), r.pop("entry"))
            results[key] = Outcome(**r)
    for case in CASES:
        if only and case.name not in only:
            continue
        for entry in ENTRY_POINTS:
            if entry in case.slow_on and not run_all:
                o = Outcome("skipped", "minutes on 2 CPU cores (--all runs it)", 0.0)
                results[(case.name, entry)] = o
                continue
            o = run(entry, case)
            results[(case.name, entry)] = o
            print(f"{case.name} | {entry} | {cell(o)}", flush=True)
    entries = list(ENTRY_POINTS)
    lines = ["| input | " + " | ".join(entries) + " |", "|---" * (len(entries) + 1) + "|"]
    for case in CASES:
        lines.append(f"| {case.name} | " + " | ".join(cell(results[(case.name, e)]) for e in entries) + " |")
    defects = sum(not o.acceptable and o.kind != "skipped" for o in results.values())
    lines += ["", f"{len(CASES)} inputs x {len(entries)} entry points = {len(results)} calls; "
                  f"unexpected exceptions: {defects}"]
    out = ROOT / "benchmarks" / "results"
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    (out / "robustness.json").write_text(json.dumps(
        [{"case": c, "entry": e, **asdict(o)} for (c, e), o in results.items()], indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
