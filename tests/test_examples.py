"""The examples run end to end, offline, as a user runs them (one question each)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("script,args", [
    ("langchain_rag.py", ["--questions", "1", "--device", "cpu"]),
    ("llama_index_rag.py", ["--questions", "1", "--device", "cpu"]),
    ("chain_gsm8k.py", ["--questions", "1", "--device", "cpu"]),
    ("compress_nq.py", ["--cases", "1", "--device", "cpu"]),
])
def test_example_runs_and_reports(script, args):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT / "examples", capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "->" in out  # tokens before -> after
    if script != "compress_nq.py":
        assert "answer (SmolLM2-135M-Instruct):" in out
