"""The quality harness: does what a reader needs survive compression?

Without a reader LLM we measure what can be measured honestly on real questions nobody
here wrote (``../shared/data``):

* **NaturalQuestions multi-document QA** (LongLLMLingua's setting): one question, its
  gold passage and 19 dense-retrieved distractors (:func:`.nq.build_cases`), each
  formatted ``Document [i](Title: ...) text`` as in the lost-in-the-middle prompts.
  Metrics: a gold answer survives as a whole-word span of the compressed context
  (SQuAD normalisation); the gold passage survives coarse selection; achieved rate;
  seconds per call.
* **GSM8K few-shot demonstrations** (LLMLingua's setting): the 8 training solutions
  with the most reasoning lines, as an 8-shot chain-of-thought prompt. Metrics: share
  of the demonstrations' numbers and operators kept; demonstrations kept.

Methods side by side at each rate: ours (the default mode and each paper method), the
reference ``llmlingua`` 0.2.2 on the same model in its own environment, and plain
baselines (BM25 top documents, random word drop, Selective-Context).

usage: python -m lingua_integrations.evaluation.quality [--cases 20] [--seed 1] [--data PATH]
       [--rates 0.5,0.33,0.2,0.1,0.05] [--methods ...] [--no-reference] [--out docs/quality.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..engine import SEPARATOR, CompressionEngine
from .baselines import SelectiveContext, bm25_top_documents, random_word_drop
from .nq import NQCase, build_cases, contains_answer, load_rows

RATES = (0.5, 0.33, 0.2, 0.1, 0.05)
# ours: options on top of ``CompressionEngine.compress``
OURS: dict[str, dict[str, Any]] = {
    "ours default": {},
    "ours longllmlingua (paper)": dict(ranking="perplexity", granularity="token", evidence=False),
    "ours llmlingua": dict(method="llmlingua"),
    # the distilled MiniLM (LLMLingua-2) with BM25 ranking: no causal LM in the call at all
    "ours llmlingua2 (distilled)": dict(method="llmlingua2", ranking="bm25"),
}
REFERENCE_LONG = dict(condition_in_question="after_condition", reorder_context="sort",
                      dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100",
                      rank_method="longllmlingua")
BASELINES = ("bm25 top documents", "random word drop", "selective-context")
NQ_METHODS = (*OURS, "reference longllmlingua", *BASELINES)
GSM8K_METHODS = ("ours default", "ours llmlingua (paper)", "reference llmlingua", "random word drop",
                 "selective-context")


@dataclass
class Sample:
    task: str  # "nq" or "gsm8k"
    method: str
    rate: float  # asked
    case: int
    achieved: float  # compressed / original target-LLM tokens, question included
    seconds: float
    answer_kept: bool | None = None  # nq
    gold_kept: bool | None = None  # nq; None when the method does not say
    numbers_kept: float | None = None  # gsm8k
    demos_kept: int | None = None  # gsm8k; None when the method does not select demonstrations


def format_documents(case: NQCase) -> list[str]:
    """The case's passages as LongLLMLingua's NQ prompts show them (with titles)."""
    return [f"Document [{i + 1}](Title: {t}) {d}" for i, (t, d) in enumerate(zip(case.titles, case.documents))]


def gold_ranks(engine: CompressionEngine, cases: Sequence[NQCase], ranking: str = "auto") -> list[int]:
    """Where each case's gold passage lands (0 = first) in the engine's ranking."""
    ranks = []
    for case in cases:
        order = [r.index for r in engine.rank(format_documents(case), case.question, ranking)]
        ranks.append(order.index(case.gold_index))
    return ranks


def _strip_question(prompt: str, question: str) -> str:
    prompt = prompt.rstrip()
    return prompt[: -len(question)].rstrip() if question and prompt.endswith(question) else prompt


# ---------------------------------------------------------------------------- NQ
def run_nq(cases: Sequence[NQCase], rates: Sequence[float], methods: Sequence[str], engine: CompressionEngine,
           reference: Callable[[list[dict]], list[dict]] | None = None, seed: int = 0,
           progress: Callable[[str], None] = lambda s: None) -> list[Sample]:
    count = engine.count
    selective = SelectiveContext(engine.scorer)
    samples: list[Sample] = []
    requests = []
    for k, case in enumerate(cases):
        docs = format_documents(case)
        engine._rankings.clear()  # the first rate ranks from scratch; later rates reuse the ranking
        origin = count(SEPARATOR.join(docs + [case.question]))
        fixed = count(case.question)

        def add(method: str, rate: float, context: str, seconds: float, gold: bool | None) -> None:
            achieved = count(SEPARATOR.join([p for p in (context, case.question) if p])) / origin
            samples.append(Sample("nq", method, rate, k, achieved, seconds,
                                  answer_kept=contains_answer(context, case.answers), gold_kept=gold))

        for rate in rates:
            budget = rate * origin - fixed
            for method in methods:
                if method in OURS:
                    t = time.perf_counter()
                    res = engine.compress(docs, question=case.question, rate=rate, **OURS[method])
                    seconds = time.perf_counter() - t
                    context = SEPARATOR.join(res.contexts[i].text for i in res.order)
                    add(method, rate, context, seconds, res.contexts[case.gold_index].kept)
                elif method == "bm25 top documents":
                    t = time.perf_counter()
                    context, kept = bm25_top_documents(case.question, docs, budget, count)
                    add(method, rate, context, time.perf_counter() - t, case.gold_index in kept)
                elif method == "random word drop":
                    t = time.perf_counter()
                    context = random_word_drop(docs, budget / max(1, origin - fixed), seed=seed * 1000 + k)
                    add(method, rate, context, time.perf_counter() - t, None)
                elif method == "selective-context":
                    t = time.perf_counter()
                    context = selective(docs, budget, count)
                    add(method, rate, context, time.perf_counter() - t, None)
                elif method == "reference longllmlingua":
                    requests.append((k, rate, {"context": docs, "question": case.question,
                                               "kwargs": {**REFERENCE_LONG, "rate": rate}}))
                else:
                    raise ValueError(f"unknown method {method!r}; choose from {NQ_METHODS}")
        progress(f"nq case {k + 1}/{len(cases)}")
    if requests and reference is not None:
        for (k, rate, req), res in zip(requests, reference([r for _, _, r in requests])):
            case = cases[k]
            context = _strip_question(res["compressed_prompt"], case.question)
            origin = count(SEPARATOR.join(req["context"] + [case.question]))
            samples.append(Sample("nq", "reference longllmlingua", rate, k, count(res["compressed_prompt"]) / origin,
                                  res["seconds"], answer_kept=contains_answer(context, case.answers)))
    return samples


# ---------------------------------------------------------------------------- GSM8K
_CALCULATOR = re.compile(r"<<[^>]*>>")
_NUMBERS_AND_OPERATORS = re.compile(r"\d+(?:[.,]\d+)*|[+\-*/=×÷%$]")


def gsm8k_demonstrations(rows: list[dict], shots: int = 8, pool: int = 2000, seed: int = 0) -> list[str]:
    """The ``shots`` solutions with the most reasoning lines from a seeded pool of
    training problems, formatted as chain-of-thought demonstrations."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), min(pool, len(rows)))
    picked.sort(key=lambda i: (-rows[i]["answer"].count("\n"), i))
    demos = []
    for i in picked[:shots]:
        steps, _, final = rows[i]["answer"].partition("####")
        steps = _CALCULATOR.sub("", steps).strip()
        demos.append(f"Question: {rows[i]['question'].strip()}\nLet's think step by step\n{steps}\n"
                     f"The answer is {final.strip()}")
    return demos


def numbers_kept(original: str, compressed: str) -> float:
    """Share of the original's numbers and operators (as a multiset) found in ``compressed``."""
    want = Counter(_NUMBERS_AND_OPERATORS.findall(original))
    have = Counter(_NUMBERS_AND_OPERATORS.findall(compressed))
    total = sum(want.values())
    return sum(min(n, have[t]) for t, n in want.items()) / total if total else 1.0


def run_gsm8k(prompts: Sequence[list[str]], rates: Sequence[float], methods: Sequence[str],
              engine: CompressionEngine, reference: Callable[[list[dict]], list[dict]] | None = None,
              question: str = "", seed: int = 0) -> list[Sample]:
    count = engine.count
    selective = SelectiveContext(engine.scorer)
    samples, requests = [], []
    for k, demos in enumerate(prompts):
        original = SEPARATOR.join(demos)
        origin = count(SEPARATOR.join(demos + ([question] if question else [])))
        for rate in rates:
            budget = rate * origin - (count(question) if question else 0)
            for method in methods:
                t = time.perf_counter()
                demos_kept = None
                if method in ("ours default", "ours llmlingua (paper)"):
                    opts = {} if method == "ours default" else dict(granularity="token")
                    res = engine.compress(demos, question=question, method="llmlingua", rate=rate, **opts)
                    text = SEPARATOR.join(res.contexts[i].text for i in res.order)
                    demos_kept = len(res.order)
                elif method == "random word drop":
                    text = random_word_drop(demos, rate, seed=seed * 1000 + k)
                elif method == "selective-context":
                    text = selective(demos, budget, count)
                elif method == "reference llmlingua":
                    requests.append((k, rate, {"context": demos, "question": question,
                                               "kwargs": {"rate": rate, "context_budget": "+100"}}))
                    continue
                else:
                    raise ValueError(f"unknown method {method!r}; choose from {GSM8K_METHODS}")
                seconds = time.perf_counter() - t
                achieved = count(SEPARATOR.join([p for p in (text, question) if p])) / origin
                samples.append(Sample("gsm8k", method, rate, k, achieved, seconds,
                                      numbers_kept=numbers_kept(original, text), demos_kept=demos_kept))
    if requests and reference is not None:
        for (k, rate, req), res in zip(requests, reference([r for _, _, r in requests])):
            original = SEPARATOR.join(req["context"])
            origin = count(SEPARATOR.join(req["context"] + ([question] if question else [])))
            text = _strip_question(res["compressed_prompt"], question)
            samples.append(Sample("gsm8k", "reference llmlingua", rate, k, count(res["compressed_prompt"]) / origin,
                                  res["seconds"], numbers_kept=numbers_kept(original, text)))
    return samples


# ---------------------------------------------------------------------------- report
def _mean(values: Sequence[float | bool | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """One row per (task, method, rate): means over cases."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.task, s.method, s.rate), []).append(s)
    rows = []
    for (task, method, rate), ss in groups.items():
        rows.append(dict(
            task=task, method=method, rate=rate, cases=len(ss), achieved=_mean([s.achieved for s in ss]),
            seconds=statistics.median(s.seconds for s in ss), answer_kept=_mean([s.answer_kept for s in ss]),
            gold_kept=_mean([s.gold_kept for s in ss]), numbers_kept=_mean([s.numbers_kept for s in ss]),
            demos_kept=_mean([s.demos_kept for s in ss]),
        ))
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Two tables (NQ, GSM8K): methods as rows, one column per asked rate."""
    out = []
    for task, metrics in (("nq", ("answer_kept", "gold_kept", "achieved", "seconds")),
                          ("gsm8k", ("numbers_kept", "demos_kept", "achieved", "seconds"))):
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        rates = sorted({r["rate"] for r in task_rows}, reverse=True)
        methods = list(dict.fromkeys(r["method"] for r in task_rows))
        by = {(r["method"], r["rate"]): r for r in task_rows}
        for metric in metrics:
            out.append(f"\n**{task.upper()} — {metric.replace('_', ' ')}** "
                       f"({task_rows[0]['cases']} case{'s' if task_rows[0]['cases'] != 1 else ''} per cell; "
                       f"{'median' if metric == 'seconds' else 'mean'})\n")
            out.append("| method | " + " | ".join(f"rate {r}" for r in rates) + " |")
            out.append("|---|" + "---|" * len(rates))
            for m in methods:
                cells = [_fmt(by[(m, r)][metric], 1 if metric == "demos_kept" else 2) if (m, r) in by else ""
                         for r in rates]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Answer kept versus asked rate per method (NQ). Needs matplotlib; False without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    nq = [r for r in rows if r["task"] == "nq"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in nq):
        pts = sorted((r["rate"], r["answer_kept"]) for r in nq if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["rate"] for r in nq}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("asked rate (share of tokens kept)")
    ax.set_ylabel("gold answer kept")
    ax.set_title("NaturalQuestions, 20 documents, SmolLM2-135M")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parents[2]
    ap.add_argument("--data", default=str(root.parent / "shared/data/nq-open-oracle-dev.jsonl.gz"),
                    help="NQ-open oracle rows (question, answers, title, text), .jsonl or .jsonl.gz")
    ap.add_argument("--gsm8k", default=str(root.parent / "shared/data/gsm8k-train.jsonl.gz"),
                    help="GSM8K rows (question, answer); '' to skip")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--gsm8k-prompts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--methods", default=",".join(NQ_METHODS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference llmlingua 0.2.2 columns")
    ap.add_argument("--reference-env", default=None, help="folder of tools/reference/setup.sh (default .cache/reference-env)")
    ap.add_argument("--reference-from", default=None,
                    help="take the reference columns from an earlier run's --json (same cases, seed and rates) "
                         "instead of running the reference again")
    ap.add_argument("--out", default=None, help="write the tables (markdown) here, the plot beside it")
    ap.add_argument("--json", default=None, help="write every sample and the summary here")
    args = ap.parse_args(argv)

    rates = [float(r) for r in args.rates.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.no_reference:
        methods = [m for m in methods if not m.startswith("reference")]
    engine = CompressionEngine.shared(args.model, device=args.device, dtype="float32")
    reference: Callable[[list[dict]], list[dict]] | None = None
    if any(m.startswith("reference") for m in methods):
        from ..models import cache_dir, materialize_embedded
        from .reference import run_reference

        model_dir = materialize_embedded(args.model) if args.model == "smollm2-135m" else args.model
        env = Path(args.reference_env) if args.reference_env else None

        store = cache_dir() / "reference-results"

        def run_ref(requests: list[dict]) -> list[dict]:
            """The reference's results, cached on disk by request (the reference is
            deterministic on CPU: same inputs, model files and version, same output)."""
            keys = [hashlib.sha1(json.dumps([str(model_dir), args.device, r], sort_keys=True).encode()).hexdigest()
                    for r in requests]
            todo = [i for i, k in enumerate(keys) if not (store / f"{k}.json").is_file()]
            if todo:
                fresh = run_reference([requests[i] for i in todo], model_dir, device=args.device, env_dir=env,
                                      timeout=6 * 3600)
                store.mkdir(parents=True, exist_ok=True)
                for i, res in zip(todo, fresh):
                    (store / f"{keys[i]}.json").write_text(json.dumps(res))
            return [json.loads((store / f"{k}.json").read_text()) for k in keys]

        reference = run_ref

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    cases = build_cases(load_rows(args.data), args.cases, seed=args.seed)
    samples = run_nq(cases, rates, [m for m in methods if m in NQ_METHODS], engine, reference, args.seed, log)
    if args.gsm8k and args.gsm8k_prompts > 0:
        rows = load_rows(args.gsm8k)
        prompts = [gsm8k_demonstrations(rows, seed=args.seed * 100 + k) for k in range(args.gsm8k_prompts)]
        gsm_methods = [m for m in GSM8K_METHODS if not (args.no_reference and m.startswith("reference"))]
        samples += run_gsm8k(prompts, rates, gsm_methods, engine, reference, seed=args.seed)
        log("gsm8k done")
    if args.reference_from:
        earlier = json.loads(Path(args.reference_from).read_text())
        ref = [Sample(**x) for x in earlier["samples"] if x["method"].startswith("reference") and x["rate"] in rates
               and x["case"] < (args.cases if x["task"] == "nq" else args.gsm8k_prompts)]
        if not ref:
            raise SystemExit(f"{args.reference_from} has no reference samples for these cases and rates")
        log(f"reference columns from {args.reference_from} ({earlier['command']})")
        samples += ref
    summary = summarize(samples)
    table = markdown(summary)
    print(table)
    command = "python -m lingua_integrations.evaluation.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        out = Path(args.out)
        image = out.with_suffix(".png")
        has_plot = plot(summary, image)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"<!-- generated by: {command.strip()} -->\n" + table
                       + (f"\n![answer kept vs rate]({image.name})\n" if has_plot else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": command.strip(), "seconds": time.perf_counter() - started, "summary": summary,
            "samples": [asdict(s) for s in samples]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
