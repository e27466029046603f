"""Where the time goes on a GPU: cProfile of our hot paths (no reference run).

Diagnostics for issue 5, not a benchmark of record: for the SmolLM2 and Llama-2-7B shapes
(random weights, real tokenizer, NQ passages, as ``benchmarks/speed.py``) it times and
profiles the drop-in and default-mode calls, counts device passes and tokens, and profiles
LLMLingua-2 on the XLM-R-large shape against its encoder alone::

    python benchmarks/profile_gpu.py --assets .cache/gpu --out $OUT/profile [--shapes smollm2-135m-shape]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

from lingua_integrations.compat import PromptCompressor  # noqa: E402


def methods(question: str) -> tuple[tuple[str, dict], ...]:
    """The drop-in calls every comparison makes: LLMLingua, and LongLLMLingua as the reference recommends."""
    return ("llmlingua", {"rate": 0.3}), ("longllmlingua", {"question": question, "rate": 0.3, **speed.LONG})


def timed(fn) -> tuple[float, object]:
    """Seconds one call takes, device work included, and its result."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, result


def interleaved(call, settings: tuple, apply, runner, rounds: int = 3) -> tuple[dict, dict, dict]:
    """A/B timing of ``call`` under each of ``settings`` (``apply(setting)`` switches it), the
    settings alternating within each round so drift in the host hits all alike: the median
    seconds, the last compressed text and the device passes of one call, per setting."""
    times: dict = {s: [] for s in settings}
    outs, passes = {}, {}
    for _ in range(rounds):
        for setting in settings:
            apply(setting)
            before = runner.forward_passes
            seconds, result = timed(call)
            passes[setting] = runner.forward_passes - before
            outs[setting] = result["compressed_prompt"] if isinstance(result, dict) else result.compressed_prompt
            times[setting].append(seconds)
    return {s: sorted(t)[len(t) // 2] for s, t in times.items()}, outs, passes


def kernel_table(prof, rows: int) -> str:
    """A torch.profiler run's operators by their own device time, the ``rows`` largest."""
    try:
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows)
    except (AttributeError, KeyError, ValueError):  # older torch names it after CUDA
        return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)


def profiled(label: str, fn, out: Path, repeats: int = 3, top: int = 35) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / repeats
    prof = cProfile.Profile()
    prof.enable()
    fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    with open(out / "profiles.txt", "a") as f:  # one file: the device returns few files
        f.write(f"==== {label}: {seconds:.4f} s\n{buf.getvalue()}\n")
    print(f"{label}: {seconds:.4f} s", flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=".cache/gpu")
    ap.add_argument("--out", default="benchmarks/results/profile")
    ap.add_argument("--shapes", nargs="*", default=list(speed.SHAPES))
    ap.add_argument("--docs", nargs="*", type=int, default=[20, 60])
    ap.add_argument("--llmlingua2", action="store_true")
    ap.add_argument("--compare-static", action="store_true", help="static-cache graphs vs the dynamic cache")
    ap.add_argument("--compare-padding", action="store_true", help="eager batches capped at 10%% padding vs uncapped")
    ap.add_argument("--compare-packing", action="store_true", help="packed rows vs right-padded batches")
    ap.add_argument("--kernels", action="store_true", help="device-time table (torch.profiler) of the drop-in calls")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(args.assets)
    docs, questions = speed.load_passages(assets / "data" / "nq-open-oracle-dev.jsonl.gz")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    q = questions[0]
    for shape in args.shapes:
        speed.build_causal(speed.SHAPES[shape], tok, shape)
        pc = PromptCompressor(shape, device_map="cuda")
        engine = pc.engine
        runner = engine.loaded.scoring_queue().runner
        for nd in args.docs:
            for method, kw in methods(q):
                passes = runner.forward_passes
                profiled(f"{shape}-{method}-{nd}-dropin", lambda: pc.compress_prompt(docs[:nd], **kw), out)
                print(f"  forward passes per call: {(runner.forward_passes - passes) / 5:.1f}", flush=True)
                dkw = {"question": q} if method == "longllmlingua" else {}
                profiled(f"{shape}-{method}-{nd}-default",
                         lambda: speed.compress_fresh(engine, docs[:nd], method=method, rate=0.3, **dkw), out)
        if args.compare_static and engine.scorer.kv_cache:
            # the static-cache/graph path against the dynamic cache: same outputs? how much faster?
            from lingua_integrations.kv_graphs import StaticPool

            sc = engine.scorer
            static_pool = sc.static
            print(f"  static path enabled after the runs: {static_pool.enabled}", flush=True)
            for nd in args.docs:
                for method, kw in methods(q):
                    outs, times = [], []
                    for pool in (static_pool, StaticPool(sc.model, sc.loaded.lock, 1, 0, enabled=False)):
                        sc.static = pool
                        pc.compress_prompt(docs[:nd], **kw)
                        seconds, result = timed(lambda: pc.compress_prompt(docs[:nd], **kw))
                        outs.append(result["compressed_prompt"])
                        times.append(seconds)
                    sc.static = static_pool
                    print(f"  {method} {nd} docs: static {times[0]:.3f} s, dynamic {times[1]:.3f} s, "
                          f"kept-word F1 {speed.words_f1(outs[0], outs[1]):.4f}", flush=True)
        if args.compare_padding and not runner.graphs:
            for nd in args.docs:
                for method, kw in methods(q):
                    call = lambda: pc.compress_prompt(docs[:nd], **kw)  # noqa: E731
                    med, outs, _ = interleaved(call, (0.1, None), lambda cap: setattr(runner, "max_padding", cap), runner)
                    runner.max_padding = 0.1
                    print(f"  {method} {nd} docs: padding capped {med[0.1]:.3f} s, uncapped "
                          f"{med[None]:.3f} s, kept-word F1 {speed.words_f1(outs[0.1], outs[None]):.4f}",
                          flush=True)
        if args.compare_packing:
            for nd in args.docs:
                for method, kw in methods(q):
                    dkw = {"question": q} if method == "longllmlingua" else {}
                    calls = {"drop-in": lambda: pc.compress_prompt(docs[:nd], **kw),
                             "default": lambda: speed.compress_fresh(engine, docs[:nd], method=method, rate=0.3,
                                                                     **dkw)}
                    for label, call in calls.items():
                        for pack in ("auto", False):  # warm-up: graph captures and the packing probe
                            runner.pack = pack
                            call()
                        med, outs, passes = interleaved(call, ("auto", False),
                                                        lambda pack: setattr(runner, "pack", pack), runner)
                        runner.pack = "auto"
                        print(f"  {method} {label} {nd} docs: packed {med['auto']:.3f} s "
                              f"({passes['auto']} passes), padded {med[False]:.3f} s ({passes[False]}), "
                              f"kept-word F1 {speed.words_f1(outs['auto'], outs[False]):.4f}, probe {runner._pack_ok}",
                              flush=True)
        if args.kernels:
            from torch.profiler import ProfilerActivity, profile

            nd = max(args.docs)
            kw = dict(methods(q))["longllmlingua"]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                pc.compress_prompt(docs[:nd], **kw)
                torch.cuda.synchronize()
            table = kernel_table(prof, 25)
            with open(out / "profiles.txt", "a") as f:
                f.write(f"==== kernels {shape} longllmlingua {nd} drop-in\n{table}\n")
        if shape.startswith("smollm2"):
            jobs = [(docs[20 * k : 20 * k + 20], questions[20 * k]) for k in range(16)]
            profiled(f"{shape}-16-sequential-default",
                     lambda: [speed.compress_fresh(engine, d, question=qq, rate=0.33) for d, qq in jobs], out,
                     repeats=1, top=60)
        pc = engine = None
        speed.release_models()
    if args.llmlingua2:
        enc = speed.build_encoder(assets)
        pc2 = PromptCompressor("xlmr-large-shape", device_map="cuda", use_llmlingua2=True)
        big = "\n\n".join(docs[:300])
        profiled("llmlingua2-33k", lambda: pc2.compress_prompt(big, rate=0.33, force_tokens=["\n", "?"]), out)
        ids = torch.randint(1000, 30000, (80, 512), device="cuda")
        with torch.inference_mode():
            profiled("encoder-80x512", lambda: enc(input_ids=ids).logits.sum().item(), out)
        llmlingua2_phases(pc2, big)


def llmlingua2_phases(pc2: PromptCompressor, text: str, rounds: int = 5) -> None:
    """Where a drop-in LLMLingua-2 call's time goes around the encoder (medians, ms): host
    work before the first launch, from the first launch to the last (tokenizing the rest
    while the device runs, with streaming), host work after it while the device runs,
    waiting for the device, and host work after; then the same call with graphs and
    streaming against eager passes over all windows at once (time, same output?)."""
    from lingua_integrations import classifier_runner as cr
    from lingua_integrations import token_classification as tc

    marks: dict[str, float] = {}
    clf = pc2.engine.classifier
    runner = clf.runner
    launch, wait = cr.KeepProbRunner.launch, tc.PendingWords.wait

    def timed_launch(self, *args, **kwargs):
        marks.setdefault("launch", time.perf_counter())
        result = launch(self, *args, **kwargs)
        marks["launched"] = time.perf_counter()
        return result

    def timed_wait(self):
        marks["wait"] = time.perf_counter()
        result = wait(self)
        marks["waited"] = time.perf_counter()
        return result

    def call():
        return pc2.compress_prompt(text, rate=0.33, force_tokens=["\n", "?"])

    cr.KeepProbRunner.launch, tc.PendingWords.wait = timed_launch, timed_wait
    phases: dict[str, list[float]] = {k: [] for k in ("before first launch", "first to last launch",
                                                      "host while device runs", "waiting for device", "after", "total")}
    try:
        for _ in range(rounds + 1):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            for key, value in (("before first launch", marks["launch"] - t0),
                               ("first to last launch", marks["launched"] - marks["launch"]),
                               ("host while device runs", marks["wait"] - marks["launched"]),
                               ("waiting for device", marks["waited"] - marks["wait"]),
                               ("after", t1 - marks["waited"]), ("total", t1 - t0)):
                phases[key].append(value)
    finally:
        cr.KeepProbRunner.launch, tc.PendingWords.wait = launch, wait
    for key, values in phases.items():
        print(f"  llmlingua2 phase {key:24s} {1000 * sorted(values[1:])[rounds // 2]:7.1f} ms", flush=True)
    print(f"  graphs captured: {sorted(runner._captured)}", flush=True)

    settings = ("graphs, streaming", "graphs, one tokenizer call", "eager, one tokenizer call")

    def apply(setting: str) -> None:
        runner.graphs = setting.startswith("graphs")
        clf.stream = None if setting == settings[0] else False

    times, outs, _ = interleaved(call, settings, apply, runner, rounds=9)
    apply(settings[0])
    for setting in settings:
        f1 = speed.words_f1(outs[setting], outs[settings[0]])
        print(f"  llmlingua2 {setting:28s} {1000 * times[setting]:6.1f} ms (median of 9, interleaved); "
              f"kept-word F1 vs the first {f1:.4f}", flush=True)


if __name__ == "__main__":
    main()
