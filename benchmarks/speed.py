"""Speed against the reference, in one run: ours and llmlingua 0.2.2 on the same inputs and
model shapes, medians and ratios in one table (issue 5).

GPU (H100; random weights of real shapes, real tokenizers, NQ dev passages, as
``shared/docs/ANCHORS.md``)::

    python benchmarks/speed.py --device cuda --assets .cache/gpu --reference-path /tmp/ref

  ``.cache/gpu`` is the carry folder (see ``benchmarks/gpu_smoke.py``; ``ref/`` in it is
  what ``shared/tools/upstream_anchor/make_assets.py`` builds, ``refwheels/`` the
  reference's wheels, installed there with ``pip install --no-deps --target /tmp/ref``).

CPU (this machine, real SmolLM2-135M weights, LongLLMLingua over 20 documents)::

    python benchmarks/speed.py --device cpu

Results: ``benchmarks/results/speed-<device>.{json,md}``; the GPU plot ``docs/speed.png``
(drawn by ``--plot`` from the JSON).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_integrations import CompressionEngine  # noqa: E402
from lingua_integrations.compat import PromptCompressor  # noqa: E402
from lingua_integrations.evaluation.reference import reference_env_dir, subprocess_env  # noqa: E402
from lingua_integrations.models import ModelRegistry  # noqa: E402

LONG = dict(condition_in_question="after_condition", reorder_context="sort", dynamic_context_compression_ratio=0.3,
            condition_compare=True, context_budget="+100", rank_method="longllmlingua")
SHAPES = {"smollm2-135m-shape": (576, 1536, 30, 9, 3), "llama2-7b-shape": (4096, 11008, 32, 32, 32)}
XLMR_LARGE = (1024, 24, 16)
RESULTS = ROOT / "benchmarks" / "results"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeats: int):
    fn()  # warm-up (and CUDA-graph capture for the shapes this input needs)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def compress_fresh(engine: CompressionEngine, *args, **kwargs):
    """``engine.compress`` as a new retrieval would run it: without the engine's memoised
    ranking of these documents (timed calls repeat the same ones)."""
    engine.clear_rankings()
    return engine.compress(*args, **kwargs)


def words_f1(a: str, b: str) -> float:
    ca, cb = collections.Counter(a.lower().split()), collections.Counter(b.lower().split())
    overlap = sum((ca & cb).values())
    return 2 * overlap / (sum(ca.values()) + sum(cb.values())) if ca or cb else 1.0


def load_passages(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in gzip.open(path, "rt")]
    return [r["text"] for r in rows], [r["question"] for r in rows]


def run_reference(spec: dict, python: str, path: str) -> list[dict]:
    """The reference's timings, from its own environment (``path``) in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = subprocess_env(Path(path), Path(tmp))
        subprocess.run([python, str(ROOT / "benchmarks" / "_reference_speed.py"), str(spec_path), str(out_path)],
                       env=env, check=True)
        return json.loads(out_path.read_text())


def build_causal(shape, tokenizer, name: str, dtype=torch.float16, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, l, a, kv = shape
    cfg = LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=i, num_hidden_layers=l,
                      num_attention_heads=a, num_key_value_heads=kv, max_position_embeddings=8192)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return ModelRegistry.register(name, model, tokenizer)


def build_encoder(assets: Path, name: str = "xlmr-large-shape"):
    """The XLM-R-large shape as a token classifier (random weights, bf16, on the GPU) with the
    BERT vocabulary and tokenizer, registered as ``name``; returns the model."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    h, layers, heads = XLMR_LARGE
    with torch.device("cuda"):
        enc = BertForTokenClassification(BertConfig(vocab_size=30522, hidden_size=h, num_hidden_layers=layers,
                                                    num_attention_heads=heads, intermediate_size=4 * h, num_labels=2))
    enc = enc.to(torch.bfloat16)
    ModelRegistry.register(name, enc, AutoTokenizer.from_pretrained(assets / "minilm"), kind="token-classification")
    return enc


def release_models() -> None:
    """Forget every loaded model and shared engine, and give their GPU memory back."""
    ModelRegistry.clear()
    CompressionEngine._shared.clear()
    torch.cuda.empty_cache()


def gpu(args) -> dict:
    from transformers import AutoTokenizer

    assets = Path(args.assets)
    docs, questions = load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    q = questions[0]
    ref_assets = assets / "ref"
    cases = []
    for shape in SHAPES:
        for nd in (20, 60):
            if shape == "llama2-7b-shape" and nd == 20 and args.quick:
                continue
            cases.append({"name": f"LLMLingua {shape} {nd} docs", "kind": "causal", "shape": SHAPES[shape],
                          "model_dir": str(ref_assets / "smollm2-tok-model"), "context": docs[:nd],
                          "kwargs": {"rate": 0.3}, "ours_model": shape})
            cases.append({"name": f"LongLLMLingua {shape} {nd} docs", "kind": "causal", "shape": SHAPES[shape],
                          "model_dir": str(ref_assets / "smollm2-tok-model"), "context": docs[:nd],
                          "kwargs": {"question": q, "rate": 0.3, **LONG}, "ours_model": shape})
    big = "\n\n".join(docs[:300])
    cases.append({"name": "LLMLingua-2 xlmr-large-shape 300 docs", "kind": "llmlingua2", "shape": XLMR_LARGE,
                  "model_dir": str(ref_assets / "bert-base-multilingual-cased-tokmodel"), "context": big,
                  "kwargs": {"rate": 0.33, "force_tokens": ["\n", "?"]}, "ours_model": "xlmr-large-shape"})
    print("reference: running in its own environment", flush=True)
    ref = {r["name"]: r for r in run_reference({"device": "cuda", "repeats": args.repeats, "cases": cases},
                                                args.reference_python, args.reference_path)}
    torch.cuda.empty_cache()

    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    rows = []
    for shape in SHAPES:
        build_causal(SHAPES[shape], tok, shape)
        pc = PromptCompressor(shape, device_map="cuda")
        engine = pc.engine
        if args.queue_depth:  # rounds on the device at once (serving.ScoringQueue; 1: serial rounds)
            engine.loaded.scoring_queue().depth = args.queue_depth
        for case in [c for c in cases if c.get("ours_model") == shape]:
            cold = time.perf_counter()
            pc.compress_prompt(case["context"], **case["kwargs"])
            sync()
            cold = time.perf_counter() - cold
            seconds, out = timeit(lambda: pc.compress_prompt(case["context"], **case["kwargs"]), args.repeats)
            r = ref[case["name"]]
            row = {"case": case["name"], "reference_s": r["seconds"], "ours_s": seconds, "ours_first_call_s": cold,
                   "ratio": r["seconds"] / seconds, "reference_rate": r["rate"], "ours_rate": out["rate"],
                   "origin_tokens": out["origin_tokens"], "f1_vs_reference": words_f1(out["compressed_prompt"],
                                                                                      r["compressed_prompt"])}
            method = "longllmlingua" if "question" in case["kwargs"] else "llmlingua"
            kw = {"question": q} if method == "longllmlingua" else {}
            row["ours_default_mode_s"], _ = timeit(lambda: compress_fresh(engine, case["context"], method=method,
                                                                          rate=0.3, **kw), args.repeats)
            rows.append(row)
            checkpoint(args, rows)
            print(row, flush=True)
        extra = {}
        extra["compiled_decoder"] = engine.loaded.scoring_queue().runner.compile
        extra["queue_depth"] = engine.loaded.scoring_queue().depth
        if shape == "smollm2-135m-shape":
            extra["concurrency"] = concurrency(engine, docs, questions, args.calls)
            extra["fidelity_gpu_vs_cpu_fp32"] = fidelity_random(engine, docs, questions, tok, shape)
        else:
            extra["long_context"] = long_context(engine, docs, q)
        rows.append({"case": f"_extra {shape}", **extra})
        checkpoint(args, rows)
        print(extra, flush=True)
        pc = engine = None
        release_models()

    # LLMLingua-2 on the XLM-R-large shape (BERT vocabulary, as the reference's run)
    enc = build_encoder(assets)
    pc2 = PromptCompressor("xlmr-large-shape", device_map="cuda", use_llmlingua2=True)
    case = cases[-1]
    seconds, out = timeit(lambda: pc2.compress_prompt(case["context"], **case["kwargs"]), args.repeats)
    encoder_s, _ = timeit(lambda: enc(input_ids=torch.randint(1000, 30000, (80, 512), device="cuda")).logits.sum().item(),
                          args.repeats)
    r = ref[case["name"]]
    rows.append({"case": case["name"], "reference_s": r["seconds"], "ours_s": seconds, "ratio": r["seconds"] / seconds,
                 "encoder_forward_s": encoder_s, "ours_over_encoder": seconds / encoder_s,
                 "reference_rate": r["rate"], "ours_rate": out["rate"], "origin_tokens": out["origin_tokens"]})
    print(rows[-1], flush=True)
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}


def checkpoint(args, rows: list[dict]) -> None:
    """Partial results, so a failure late in a long GPU run loses nothing measured."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"speed-{args.device}.partial.json").write_text(json.dumps(rows, indent=1))


def concurrency(engine: CompressionEngine, docs, questions, calls: int, workers: tuple[int, ...] = (16, 64)) -> dict:
    """``calls`` compressions of 20 NQ documents each: one at a time, then all at once from
    ``calls`` threads, first in this process, then with each number of host worker
    processes in ``workers``. A worker runs one call at a time, so with W of them the
    calls run in about ``calls / W`` waves, each as many device rounds as a call has
    scoring steps; one worker per caller runs them all in one wave (a worker waits on
    the device most of the time, so more workers than cores is fine; H100, 16 cores: 16
    workers 3.8x, 64 workers 4.8x, `benchmarks/round_profile.py`)."""
    starts = [(20 * k) % (len(docs) - 20) for k in range(calls)]
    jobs = [(docs[s : s + 20], questions[s]) for s in starts]

    def one(job):
        t = time.perf_counter()
        out = engine.compress(job[0], question=job[1], rate=0.33)
        return time.perf_counter() - t, out.compressed_prompt

    for job in jobs:
        one(job)  # warm-up: every call's shapes captured (and compiled) before either timing
    engine.clear_rankings()  # timed calls rank their documents, as new retrievals would (the memo holds 64)
    t = time.perf_counter()
    alone = [one(job) for job in jobs]
    sequential_s = time.perf_counter() - t
    queue = engine.loaded.scoring_queue()

    def together() -> dict:
        with cf.ThreadPoolExecutor(calls) as pool:
            for _ in range(8):  # warm-up rounds, until one captures no new batched shape (bucketed head
                # sizes and row counts make many: four rounds were not always enough)
                captured = queue.runner.captured_shapes
                list(pool.map(one, jobs))
                if queue.runner.captured_shapes == captured:
                    break
            engine.clear_rankings()
            runner = queue.runner
            rounds0, captured = queue.rounds, runner.captured_shapes
            counts0 = runner.positions_run, runner.tokens_run, runner.head_positions
            t = time.perf_counter()
            out = list(pool.map(one, jobs))
            concurrent_s = time.perf_counter() - t
            positions, tokens, head = (now - then for now, then in
                                       zip((runner.positions_run, runner.tokens_run, runner.head_positions), counts0))
        lat = sorted(x[0] for x in out)
        return {"concurrent_s": concurrent_s, "throughput_ratio": sequential_s / concurrent_s,
                "p50_s": lat[len(lat) // 2], "p95_s": lat[int(0.95 * (len(lat) - 1))],
                "device_rounds": queue.rounds - rounds0, "shapes_captured_while_timed": queue.runner.captured_shapes - captured,
                # device work per call: positions the passes ran (padding included), the real tokens
                # among them, and the share of positions the LM head ran at
                "positions_per_call": positions / calls, "padding_share": 1 - tokens / max(1, positions),
                "head_share": head / max(1, positions),
                "same_output_share": sum(a[1] == b[1] for a, b in zip(alone, out)) / calls,
                "mean_f1_vs_alone": statistics.mean(words_f1(a[1], b[1]) for a, b in zip(alone, out))}

    result = {"calls": calls, "sequential_s": sequential_s, "alone_p50_s": sorted(x[0] for x in alone)[calls // 2],
              **together()}
    for n in workers:
        t = time.perf_counter()
        engine.start_workers(n)
        started = time.perf_counter() - t
        try:
            key = "host_workers" if n == workers[0] else f"host_workers_{n}"
            result[key] = {"processes": n, "start_s": started, "queue_depth": queue.depth, **together(),
                           "worker_startup": engine.host_workers.startup}
            if n == workers[-1]:  # the A/B of the queue's depth: rounds overlapped (2) or serial (1)
                depth, queue.depth = queue.depth, 2 if queue.depth == 1 else 1
                try:
                    result[key][f"queue_depth_{queue.depth}"] = together()
                finally:
                    queue.depth = depth
        finally:
            engine.stop_workers()
    return result


def fidelity_random(engine: CompressionEngine, docs, questions, tok, shape: str, cases: int = 5) -> dict:
    """Kept words of the GPU path (its auto dtype, float16) vs the CPU fp32 path, same (random)
    weights (real weights: ``benchmarks/fidelity.py``)."""
    cpu_model = type(engine.loaded.model)(engine.loaded.model.config)
    cpu_model.load_state_dict({k: v.float().cpu() for k, v in engine.loaded.model.state_dict().items()})
    ModelRegistry.register(shape, cpu_model.float(), tok)
    cpu = CompressionEngine(shape, device="cpu")
    f1 = []
    for k in range(cases):
        ctx, q = docs[20 * k : 20 * k + 20], questions[20 * k]
        a = engine.compress(ctx, question=q, rate=0.33).compressed_prompt
        b = cpu.compress(ctx, question=q, rate=0.33).compressed_prompt
        f1.append(words_f1(a, b))
    return {"cases": cases, "mean_f1": statistics.mean(f1), "min_f1": min(f1)}


def long_context(engine: CompressionEngine, docs, q, tokens: int = 100_000) -> dict:
    ctx, total = [], 0
    for d in docs:
        ctx.append(d)
        total += engine.count(d)
        if total >= tokens:
            break
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = engine.compress(ctx, question=q, rate=0.3)
    sync()
    return {"documents": len(ctx), "origin_tokens": out.origin_tokens, "rate": out.rate,
            "seconds": time.perf_counter() - t, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def cpu(args) -> dict:
    """Real SmolLM2-135M weights on this machine's CPU, LongLLMLingua over 20 documents."""
    from lingua_integrations.models import materialize_embedded

    data = ROOT.parent / "shared" / "data" / "nq-open-oracle-dev.jsonl.gz"
    docs, questions = load_passages(data)
    model_dir = str(materialize_embedded("smollm2-135m"))
    cases = []
    for k in range(args.cases):
        ctx, q = docs[20 * k : 20 * k + 20], questions[20 * k]
        cases.append({"name": f"LongLLMLingua 20 docs #{k}", "kind": "causal", "model_dir": model_dir, "context": ctx,
                      "kwargs": {"question": q, "rate": 0.33, **LONG}})
    ref = {r["name"]: r for r in run_reference({"device": "cpu", "repeats": 1, "cases": cases},
                                                args.reference_python, args.reference_path)}
    pc = PromptCompressor("smollm2-135m", device_map="cpu")
    rows = []
    for case in cases:  # timed as the reference's side is: a warm-up call, then one timed call
        ours, out = timeit(lambda: pc.compress_prompt(case["context"], **case["kwargs"]), 1)
        default, _ = timeit(lambda: compress_fresh(pc.engine, case["context"], question=case["kwargs"]["question"],
                                                   rate=0.33), 1)
        r = ref[case["name"]]
        rows.append({"case": case["name"], "reference_s": r["seconds"], "ours_s": ours, "ratio": r["seconds"] / ours,
                     "ours_default_mode_s": default, "f1_vs_reference": words_f1(out["compressed_prompt"],
                                                                                 r["compressed_prompt"])})
        print(rows[-1], flush=True)
    return {"device": "cpu", "threads": torch.get_num_threads(), "rows": rows,
            "median_ratio": statistics.median(r["ratio"] for r in rows)}


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}", "",
             "| case | reference s | ours s | ratio | ours default mode s | notes |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["case"].startswith("_extra"):
            continue
        notes = []
        for key in ("ours_first_call_s", "encoder_forward_s", "ours_over_encoder", "f1_vs_reference"):
            if key in r:
                notes.append(f"{key} {r[key]:.3f}")
        if "reference_rate" in r:
            notes.append(f"rates ref {r['reference_rate']} ours {r['ours_rate']}")
        lines.append(f"| {r['case']} | {r['reference_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.1f}x | "
                     f"{r.get('ours_default_mode_s', float('nan')):.3f} | {'; '.join(notes)} |")
    for r in result["rows"]:
        if r["case"].startswith("_extra"):
            lines += ["", f"{r['case'][7:]}:", "```", json.dumps({k: v for k, v in r.items() if k != "case"}, indent=1),
                      "```"]
    return "\n".join(lines) + "\n"


def _goal(case: str) -> float | None:
    """Issue 5's speed-up goal for a case (the 7B shape has one at 6.7k tokens, 60 documents, only)."""
    if "LLMLingua-2" in case:
        return 12
    if "7b" in case:
        return 4 if "60 docs" in case else None
    return 15


def plot(result: dict, path: Path) -> None:
    """Speed-up over the reference per case (drop-in and default mode), goals as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["case"].startswith("_extra")]
    labels = [r["case"].replace("-shape", "").replace(" docs", "d") for r in rows]
    drop_in = [r["ratio"] for r in rows]
    default = [r["reference_s"] / r["ours_default_mode_s"] if r.get("ours_default_mode_s") else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], drop_in, height=0.4, label="ours, drop-in PromptCompressor (same algorithm)")
    ax.barh([i - 0.2 for i in y], default, height=0.4, label="ours, default mode")
    for i, r in enumerate(rows):
        goal = _goal(r["case"])
        if goal is not None:
            ax.plot([goal, goal], [i - 0.45, i + 0.45], color="black", lw=1.5)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("times faster than llmlingua 0.2.2 (same run, same inputs); black tick: goal")
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(f"{result['device']}: median of 3 after a warm-up", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], required="--plot" not in sys.argv)
    ap.add_argument("--assets", default=str(ROOT / ".cache" / "gpu"))
    ap.add_argument("--reference-python", default=sys.executable)
    ap.add_argument("--reference-path", default=str(reference_env_dir()),
                    help="folder holding llmlingua 0.2.2 + transformers 4.46 (tools/reference/setup.sh)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--cases", type=int, default=3, help="CPU: how many 20-document cases")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--queue-depth", type=int, default=0,
                    help="scoring rounds on the device at once (default: the engine's own)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plot", metavar="JSON", help="only draw docs/speed.png from a results file")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), ROOT / "docs" / "speed.png")
        return
    result = gpu(args) if args.device == "cuda" else cpu(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-{args.device}.json").write_text(json.dumps(result, indent=1))
    (out / f"speed-{args.device}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
