"""Run the reference ``llmlingua`` 0.2.2 beside us, in its own environment.

The reference needs transformers 4.46.x; we need 5.x. So it never shares a process with
lingua_integrations: ``tools/reference/setup.sh`` installs it into a folder, and this
module runs ``reference_runner.py`` (a standalone script, never imported) as a
subprocess with that folder first on ``PYTHONPATH``, on the same inputs and model files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

RUNNER = Path(__file__).with_name("reference_runner.py")
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def reference_env_dir() -> Path:
    """``$LINGUA_REFERENCE_ENV``, else ``.cache/reference-env`` under the current directory."""
    return Path(os.environ.get("LINGUA_REFERENCE_ENV", Path.cwd() / ".cache" / "reference-env"))


def subprocess_env(env_dir: Path, workdir: Path) -> dict[str, str]:
    """Environment for a reference process: its packages first, cl100k_base offline (the
    reference's tiktoken finds it by the sha1 of its download URL), no hub access."""
    if not (Path(env_dir) / "llmlingua").is_dir():
        raise FileNotFoundError(f"reference environment missing at {env_dir}: run tools/reference/setup.sh")
    import tiktoken_ext

    tk = Path(workdir) / "tiktoken"
    tk.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(list(tiktoken_ext.__path__)[0]) / "data" / "cl100k_base.tiktoken",
                tk / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    return {**os.environ, "PYTHONPATH": str(env_dir), "TIKTOKEN_CACHE_DIR": str(tk), "HF_HUB_OFFLINE": "1"}


def run_reference(requests: Sequence[dict[str, Any]], model_dir: str | Path, device: str = "cpu",
                  llmlingua2: bool = False, env_dir: Path | None = None, timeout: int = 3600) -> list[dict]:
    """The reference's ``compress_prompt`` results (plus ``seconds``) for each request
    ``{"context": [...], "question": ..., "instruction": ..., "kwargs": {...}}``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = subprocess_env(env_dir or reference_env_dir(), Path(tmp))
        path = Path(tmp) / "requests.json"
        path.write_text(json.dumps(list(requests)))
        cmd = [sys.executable, str(RUNNER), str(model_dir), device, str(path)] + (["llmlingua2"] if llmlingua2 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"the reference failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)
