"""Memory faults on a GPU (issue 6): out-of-memory errors injected by capping the process's
GPU memory, on the SmolLM2-135M shape (random weights, real tokenizer, NQ passages).

    python3 benchmarks/gpu_faults.py --assets .cache/gpu    (on the GPU machine; see gpu_smoke.py)

Checks, each printed with PASS/FAIL and written to results/gpu-faults.json:
1. a batch that does not fit is split and retried: same surprisals as without the cap;
2. one sequence that does not fit is scored in windows (as over-long sequences are): every
   token scored, the first window exactly as without the cap;
3. a request nothing can fit fails alone with a MemoryError, and the engine keeps serving
   (that a failing request does not fail the others batched with it is tested on the CPU:
   tests/test_serving.py);
4. a whole compression call under a tight cap completes at the asked rate, close to the
   uncapped output (its long views are scored in shorter windows).
"""
import argparse
import gzip
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import SHAPES, build_causal, words_f1  # noqa: E402

from lingua_integrations import CompressionEngine  # noqa: E402
from lingua_integrations.runner import MIN_WINDOW  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default=str(ROOT / ".cache" / "gpu"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    assets = Path(args.assets)
    rows = [json.loads(line) for line in gzip.open(assets / "data" / "nq-open-oracle-dev.jsonl.gz", "rt")]
    tok = AutoTokenizer.from_pretrained(assets / "smol-tok")
    build_causal(SHAPES["smollm2-135m-shape"], tok, "smol-shape")
    engine = CompressionEngine("smol-shape", device="cuda")
    runner = engine.loaded.scoring_queue().runner
    queue = engine.loaded.scoring_queue()
    seqs = engine.scorer.encode_many([r["text"] for r in rows[:192]], special=True)
    docs, q = [r["text"] for r in rows[:20]], rows[0]["question"]
    long_seq = torch.tensor(engine.scorer.encode("\n".join(r["text"] for r in rows[:200]))[:8192])

    # big batches: 192 passages packed into ~70 rows of 512, a first pass of 64 rows (32k positions;
    # 64 passages now fit the cap: rows of their length class, 512, pack them into passes of 16 and 8 rows)
    runner.max_tokens = 1 << 17
    free_before = runner.surprisal(seqs)
    long_free = runner.surprisal([long_seq])[0]
    prompt_free = engine.compress(docs, question=q, rate=0.33).compressed_prompt
    total = torch.cuda.get_device_properties(0).total_memory
    checks = {}

    def cap(gib: float) -> None:
        """Cap the process at what it holds now plus ``gib`` GiB (the allocator counts reserved memory)."""
        torch.cuda.set_per_process_memory_fraction(1.0)
        runner._captured.clear()  # captured graphs hold their pools: release them before measuring
        runner._pool = None
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + gib * 2**30) / total))

    # 1. batch split
    cap(1.0)
    ooms = runner.oom_events
    capped = runner.surprisal(seqs)
    same = all(torch.allclose(a, b, atol=2e-2) for a, b in zip(capped, free_before))
    checks["batch split and retried"] = {"pass": same and runner.oom_events > ooms,
                                         "oom_events": runner.oom_events - ooms}

    # 2. one sequence larger than memory: scored in windows
    cap(0.6)
    ooms = runner.oom_events
    try:
        windowed = runner.surprisal([long_seq])[0]
        # the first window's tokens keep their whole context; later ones see less (as in any window)
        agree = float((windowed[:MIN_WINDOW] - long_free[:MIN_WINDOW]).abs().max())
        checks["one sequence chunked"] = {"pass": len(windowed) == len(long_free) and agree < 2e-2
                                          and bool(torch.isfinite(windowed).all()),
                                          "oom_events": runner.oom_events - ooms, "tokens": len(long_seq),
                                          "max_abs_diff_first_window": agree,
                                          "mean_abs_diff_all": float((windowed - long_free).abs().mean())}
    except Exception as exc:  # noqa: BLE001 - a failure is the finding
        checks["one sequence chunked"] = {"pass": False, "error": repr(exc)[:300]}

    # 3. a request nothing can fit fails alone; the engine keeps serving afterwards
    outcome = {}
    cap(0.02)
    try:
        with queue.session():
            queue.surprisal([long_seq])
        outcome["big"] = "ok"
    except MemoryError as exc:
        outcome["big"] = f"MemoryError: {exc}"[:240]
    except Exception as exc:  # noqa: BLE001
        outcome["big"] = f"{type(exc).__name__}: {exc}"[:240]
    cap(4.0)
    outcome["small"] = len(queue.surprisal([seqs[0]])[0]) == len(seqs[0]) - 1
    after = engine.compress(docs, question=q, rate=0.33).compressed_prompt
    checks["impossible request fails alone"] = {
        "pass": outcome["big"].startswith("MemoryError") and outcome["small"] and after == prompt_free,
        "big": outcome["big"], "next_request_served": outcome["small"], "engine_serves_after": after == prompt_free}

    # 4. a whole call under a tight cap
    cap(0.5)
    try:
        ooms = runner.oom_events
        res = engine.compress(docs, question=q, rate=0.33)
        # under the cap, long views are scored in shorter windows: close to, not equal to, the free run
        f1 = words_f1(res.compressed_prompt, prompt_free)
        checks["compression under a 0.5 GiB cap"] = {"pass": f1 > 0.8 and abs(res.rate - 0.33) < 0.05,
                                                     "oom_events": runner.oom_events - ooms, "rate": res.rate,
                                                     "kept_word_f1_vs_uncapped": f1}
    except Exception as exc:  # noqa: BLE001
        checks["compression under a 0.5 GiB cap"] = {"pass": False, "error": repr(exc)[:300]}

    for name, c in checks.items():
        print(("PASS " if c["pass"] else "FAIL ") + name, c, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu-faults.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
