"""lingua-compress end to end, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(args, stdin=None):
    return subprocess.run([sys.executable, "-m", "lingua_integrations", *args], input=stdin, capture_output=True,
                          text=True, timeout=900)


def test_file_in_jsonl_out_with_bad_lines_reported(nq_cases, tmp_path):
    case = nq_cases[4]
    lines = [
        json.dumps({"context": case.documents[:6], "question": case.question, "id": "a"}),
        "{not json",
        json.dumps({"context": [1, 2]}),
        json.dumps({"context": case.documents[6:9], "instruction": "Answer briefly."}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = run_cli([str(path), "--rate", "0.4", "--device", "cpu", "--batch-size", "4"])
    assert proc.returncode == 1  # some lines failed
    out = [json.loads(l) for l in proc.stdout.splitlines()]
    assert len(out) == 4
    assert out[0]["id"] == "a" and out[0]["compressed_tokens"] < out[0]["origin_tokens"]
    assert set(out[0]["kept_indices"]) | set(out[0]["dropped_indices"]) == set(range(6))
    assert out[1] == {"line": 2, "error": out[1]["error"]} and "JSON" in out[1]["error"]
    assert out[2]["line"] == 3 and "string" in out[2]["error"]
    assert out[3]["compressed_prompt"].startswith("Answer briefly.")
    assert "line 2" in proc.stderr and "compressing" in proc.stderr  # message and progress bar


def test_stdin_and_target_tokens():
    doc = ("The Amazon river flows through Brazil, Peru and Colombia and carries more water than any other river "
           "in the world, with a basin covering about seven million square kilometres.")
    proc = run_cli(["--method", "llmlingua", "--target-tokens", "20", "--device", "cpu"],
                   stdin=json.dumps({"context": [doc]}) + "\n")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 15 <= out["compressed_tokens"] <= 25


def test_bad_arguments_exit_with_usage():
    proc = run_cli(["--rate", "0.5", "--target-tokens", "10"])
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
