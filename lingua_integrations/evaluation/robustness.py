"""Bad and unusual inputs at every public entry point (issue 6).

One list of cases (:data:`CASES`), one small caller per entry point
(:data:`ENTRY_POINTS`): the engine, the drop-in ``PromptCompressor``, the LangChain
document compressor, the LlamaIndex postprocessor and the CLI. :func:`run` records what
each gets: a result (with whether every document is accounted for and the budget held),
or a ``ValueError``/``TypeError`` and its message. Anything else (an ``IndexError``, a
CUDA assert, a hang) is a defect. ``tests/test_robustness.py`` asserts it;
``benchmarks/robustness.py`` writes the table in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..engine import CompressionEngine

NQ_SNIPPET = ("The Eiffel Tower was completed in March 1889 for the World's Fair in Paris. It is 330 metres "
              "tall and was the tallest man-made structure in the world until 1930.")
QUESTION = "When was the Eiffel Tower completed?"


@dataclass
class Case:
    name: str
    context: Any
    question: str = QUESTION
    options: dict[str, Any] = field(default_factory=dict)  # rate, target_token, method, model
    slow_on: tuple[str, ...] = ()  # entry points where this case takes minutes on 2 CPU cores


def _big_document(size: int = 2_000_000) -> str:
    return (NQ_SNIPPET + "\n") * (size // (len(NQ_SNIPPET) + 1) + 1)


CASES: list[Case] = [
    Case("empty list", []),
    Case("empty string", ""),
    Case("whitespace-only strings", ["   ", "\n\t \n"]),
    Case("None as context", None),
    Case("None among documents", [NQ_SNIPPET, None]),
    Case("a number among documents", [NQ_SNIPPET, 42]),
    Case("bytes as context", NQ_SNIPPET.encode()),
    Case("one 2 MB document", _big_document()),
    Case("5,000 documents", [f"Record {i}: item {i} was shipped on day {i % 28 + 1}." for i in range(5000)]
         + [NQ_SNIPPET], options={"rate": 0.05}, slow_on=("PromptCompressor",)),
    Case("CJK", ["東京タワーは1958年に完成した電波塔で、高さは333メートルです。", "北京是中华人民共和国的首都。"],
         question="東京タワーはいつ完成しましたか？"),
    Case("Arabic and Hebrew (RTL)", ["برج إيفل هو برج حديدي في باريس اكتمل عام 1889.",
                                     "מגדל אייפל הושלם בשנת 1889 בפריז."], question="متى اكتمل برج إيفل؟"),
    Case("emoji and ZWJ sequences", ["Family trip 👨‍👩‍👧‍👦 to Paris 🇫🇷 in 1889 🗼✨ was great 👍🏽.", NQ_SNIPPET]),
    Case("combining marks", ["Ame\u0301lie visited the Eiffel To\u0308wer; Z\u0351\u0352a\u0353lgo text.", NQ_SNIPPET]),
    Case("zero-width and control characters", ["Eiffel\u200bTower\u200c built\u200d in\ufeff 1889\x00\x07\x1b[31m red",
                                               NQ_SNIPPET]),
    Case("HTML", ["<html><body><div class='x'><p>The tower was <b>completed</b> in 1889.</p>"
                  "<script>alert(1)</script></div></body></html>", NQ_SNIPPET]),
    Case("code", ["def completed(year: int) -> bool:\n    return year == 1889  # Eiffel\n\nprint(completed(1889))",
                  NQ_SNIPPET]),
    Case("JSON", ['{"name": "Eiffel Tower", "completed": 1889, "height_m": 330, "tags": ["paris", null]}',
                  NQ_SNIPPET]),
    Case("logs", ["2026-11-23T15:43:10Z INFO tower.build completed=1889 height=330m\n"
                  "2026-11-23T15:43:11Z ERROR worker-3 Traceback (most recent call last): KeyError: 'x'",
                  NQ_SNIPPET]),
    Case("a document tagging itself keep-all", ["<llmlingua, compress=False>" + NQ_SNIPPET * 3 + "</llmlingua>",
                                                NQ_SNIPPET], options={"rate": 0.3}),
    Case("rate 0", [NQ_SNIPPET], options={"rate": 0.0}),
    Case("rate -0.5", [NQ_SNIPPET], options={"rate": -0.5}),
    Case("rate 1.5", [NQ_SNIPPET], options={"rate": 1.5}),
    Case("target_token 0", [NQ_SNIPPET], options={"target_token": 0}),
    Case("target_token -5", [NQ_SNIPPET], options={"target_token": -5}),
    Case("target_token above the input", [NQ_SNIPPET], options={"target_token": 10**9}),
    Case("unknown method", [NQ_SNIPPET], options={"method": "gpt-compress"}),
    Case("unknown model (hub id, offline)", [NQ_SNIPPET], options={"model": "no-such-org/no-such-model"}),
    Case("model path that does not exist", [NQ_SNIPPET], options={"model": "./no/such/dir"}),
    Case("question longer than the context", ["Paris."], question=" ".join([QUESTION] * 40)),
]


@dataclass
class Outcome:
    kind: str  # "result", "ValueError", "TypeError" or the unexpected exception's class name
    detail: str
    seconds: float
    documents_in: int | None = None
    documents_accounted: int | None = None
    within_budget: bool | None = None

    @property
    def acceptable(self) -> bool:
        return self.kind in ("result", "ValueError", "TypeError")


def _doc_count(context: Any) -> int | None:
    if isinstance(context, list):
        return len(context)
    return 1 if isinstance(context, str) else None


def _engine(options: dict) -> CompressionEngine:
    return CompressionEngine.shared(options.get("model", "smollm2-135m"), device="cpu")


def _budget(options: dict) -> dict:
    out = {}
    if "rate" in options:
        out["rate"] = options["rate"]
    if "target_token" in options:
        out["target_token"] = options["target_token"]
    return out


def call_engine(case: Case) -> tuple[str, int, float | None, float]:
    """(compressed text, documents accounted for, target tokens, compressed tokens)"""
    opts = case.options
    res = _engine(opts).compress(case.context, question=case.question, method=opts.get("method", "longllmlingua"),
                                 **_budget(opts))
    return res.compressed_prompt, len(res.contexts), res.target_tokens, res.compressed_tokens


def call_prompt_compressor(case: Case) -> tuple[str, int, float | None, float]:
    from ..compat import PromptCompressor

    opts = case.options
    pc = PromptCompressor(opts.get("model", "smollm2-135m"), device_map="cpu")
    kwargs = _budget(opts)
    method = opts.get("method", "longllmlingua")
    if method != "longllmlingua":
        kwargs["rank_method"] = method
    else:
        kwargs.update(rank_method="longllmlingua", condition_in_question="after_condition", reorder_context="sort",
                      dynamic_context_compression_ratio=0.3, condition_compare=True)
    res = pc.compress_prompt(case.context, question=case.question, **kwargs)
    target = kwargs.get("target_token") or None
    return res["compressed_prompt"], _doc_count(case.context) or 0, target, res["compressed_tokens"]


def _settings(case: Case) -> dict:
    opts = case.options
    s: dict[str, Any] = {"device_map": "cpu", **_budget(opts)}
    if "model" in opts:
        s["model_name"] = opts["model"]
    if "method" in opts:
        s["method"] = opts["method"]
    return s


def call_langchain(case: Case) -> tuple[str, int, float | None, float]:
    from langchain_core.documents import Document

    from ..langchain import LinguaDocumentCompressor

    comp = LinguaDocumentCompressor(include_dropped=True, **_settings(case))
    ctx = case.context
    docs = [Document(page_content=c) if isinstance(c, str) else c for c in ctx] if isinstance(ctx, list) else ctx
    if isinstance(ctx, str):
        docs = [Document(page_content=ctx)]
    out = comp.compress_documents(docs, case.question)
    text = "\n\n".join(d.page_content for d in out)
    return text, len(out), None, comp.engine().count(text)


def call_llama_index(case: Case) -> tuple[str, int, float | None, float]:
    from llama_index.core.schema import NodeWithScore, TextNode

    from ..llama_index import LinguaNodePostprocessor

    post = LinguaNodePostprocessor(include_dropped=True, **_settings(case))
    ctx = case.context
    items = [ctx] if isinstance(ctx, str) else ctx
    nodes = [NodeWithScore(node=TextNode(text=c), score=1.0) if isinstance(c, str) else c for c in items] \
        if isinstance(items, list) else items
    out = post.postprocess_nodes(nodes, query_str=case.question)
    text = "\n\n".join(n.node.get_content() for n in out)
    return text, len(out), None, post.engine().count(text)


def call_cli(case: Case) -> tuple[str, int, float | None, float]:
    from ..cli import main

    opts = case.options
    ctx = case.context
    if isinstance(ctx, bytes):
        raise TypeError("the CLI reads JSON lines: bytes cannot reach it (not JSON-serialisable)")
    argv = ["--device", "cpu", "--no-progress"]
    if "rate" in opts:
        argv += ["--rate", str(opts["rate"])]
    if "target_token" in opts:
        argv += ["--target-tokens", str(opts["target_token"])]
    if "method" in opts:
        argv += ["--method", str(opts["method"])]
    if "model" in opts:
        argv += ["--model", opts["model"]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_text(json.dumps({"context": ctx, "question": case.question}) + "\n", encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv + [str(path)])
            except SystemExit as exc:  # argparse rejects a value: exit 2 with a usage message
                code = exc.code
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
    if code:
        raise ValueError(f"exit {code}: {message}")
    res = lines[0]
    return res["compressed_prompt"], len(res["kept_indices"]) + len(res["dropped_indices"]), None, res["compressed_tokens"]


ENTRY_POINTS: dict[str, Callable[[Case], tuple[str, int, float | None, float]]] = {
    "engine": call_engine,
    "PromptCompressor": call_prompt_compressor,
    "LangChain": call_langchain,
    "LlamaIndex": call_llama_index,
    "CLI": call_cli,
}


def run(entry: str, case: Case) -> Outcome:
    """What ``entry`` does with ``case``: a result, or the exception it raises."""
    t = time.perf_counter()
    try:
        text, accounted, target, compressed = ENTRY_POINTS[entry](case)
    except (ValueError, TypeError) as exc:
        kind = "TypeError" if isinstance(exc, TypeError) else "ValueError"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines and "validation error" in lines[0]:  # pydantic: the field and what it wants
            lines = [f"{lines[1]}: {lines[2].split(' [type=')[0]}" if len(lines) > 2 else lines[0]]
        return Outcome(kind, (lines[0] if lines else repr(exc))[:200], time.perf_counter() - t)
    except Exception as exc:  # noqa: BLE001 - recorded as a defect
        return Outcome(type(exc).__name__, str(exc)[:200], time.perf_counter() - t)
    # the question is kept whole: a budget smaller than the question alone cannot be met
    floor = _engine({}).count(case.question) if isinstance(case.question, str) else 0
    within = None if target is None else compressed <= max(1.1 * target, target + 8, floor + 8)
    return Outcome("result", f"{compressed} tokens kept", time.perf_counter() - t,
                   _doc_count(case.context), accounted, within)
