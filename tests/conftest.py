"""Shared fixtures: the real embedded model and real NQ cases from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# These machines never reach the Hugging Face hub: tests run offline, so a hub id that is not
# cached fails at once instead of after minutes of retries (huggingface_hub reads the
# variable at import, which a plugin may have done already)
os.environ["HF_HUB_OFFLINE"] = "1"
import huggingface_hub.constants  # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LINGUA_SHARED_DIR", ROOT.parent / "shared"))
NQ_PATH = SHARED / "data" / "nq-open-oracle-dev.jsonl.gz"
REFERENCE_ENV = Path(os.environ.get("LINGUA_REFERENCE_ENV", ROOT / ".cache" / "reference-env"))


@pytest.fixture(scope="session")
def engine():
    from lingua_integrations import CompressionEngine

    return CompressionEngine.shared(device="cpu")


@pytest.fixture(scope="session")
def nq_rows():
    from lingua_integrations.evaluation import load_rows

    if not NQ_PATH.is_file():
        pytest.fail(f"shared data missing at {NQ_PATH}: set LINGUA_SHARED_DIR to the folder holding data/")
    return load_rows(NQ_PATH)


@pytest.fixture(scope="session")
def nq_cases(nq_rows):
    """Six 20-document cases (seeded), built as shared/data/README.md describes."""
    from lingua_integrations.evaluation import build_cases

    return build_cases(nq_rows, n_cases=6, n_docs=20, seed=7)


def is_char_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)
