"""The train step: fine-tune an encoder as an LLMLingua-2 token classifier (keep/drop).

Labels come from :mod:`.annotate` as character spans of kept words; every sub-token of a
kept word is labelled *keep* (label 1), every other sub-token *drop* (0), special and
padding positions are ignored. The result is a Hugging Face directory that
``method="llmlingua2"`` loads (``llmlingua2_model=...``): ``label2id`` names the keep label.

``train_layers`` trains only the top layers and the head: the model a user ships is
then the base model's id plus a delta of a few MB (:func:`save_delta`).
"""

from __future__ import annotations

import json
import sys
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .annotate import Annotation

logger = logging.getLogger(__name__)
LABELS = {"drop": 0, "keep": 1}


@dataclass
class TrainConfig:
    epochs: int = 6
    learning_rate: float = 1e-4
    batch_size: int = 16
    max_length: int = 512
    eval_share: float = 0.1
    patience: int = 2  # epochs without a better evaluation loss before stopping
    train_layers: int | None = None  # None: the whole encoder; k: the top k layers and the head
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on the CPU


@dataclass
class TrainResult:
    out_dir: str
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    train_samples: int = 0
    eval_samples: int = 0


def encode(tokenizer, annotation: Annotation, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and per-token labels of one annotated text (truncated to ``max_length``)."""
    enc = tokenizer(annotation.text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    kept = [span for span, keep in zip(annotation.spans, annotation.labels) if keep]
    starts = [s for s, _ in kept]
    labels = []
    import bisect

    for (s, e), special in zip(enc.offset_mapping, enc.special_tokens_mask):
        if special or e <= s or not annotation.text[s:e].strip():
            labels.append(-100)
            continue
        i = bisect.bisect_right(starts, s) - 1  # the kept word starting at or before s
        hit = i >= 0 and kept[i][1] > s
        if not hit and i + 1 < len(kept):
            hit = kept[i + 1][0] < e
        labels.append(LABELS["keep"] if hit else LABELS["drop"])
    return list(enc.input_ids), labels


def _batches(items: list[tuple[list[int], list[int]]], size: int, pad: int, shuffle: random.Random | None):
    order = list(range(len(items)))
    if shuffle:
        shuffle.shuffle(order)
    for b in range(0, len(order), size):
        rows = [items[i] for i in order[b : b + size]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, l) in enumerate(rows):
            ids[r, : len(i)], labels[r, : len(l)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(l), 1
        yield ids, mask, labels


def _layers(model) -> list[Any]:
    base = getattr(model, model.base_model_prefix, model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None) or getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the encoder layers of {type(model).__name__} to train only the top ones; "
                         "use train_layers=None")
    return list(layers)


def trainable_names(model, train_layers: int | None) -> set[str]:
    """Parameter names that are trained (all, or the top ``train_layers`` layers and the head)."""
    if train_layers is None:
        return {n for n, _ in model.named_parameters()}
    top = {id(p) for layer in _layers(model)[-train_layers:] for p in layer.parameters()} if train_layers else set()
    base = getattr(model, model.base_model_prefix, model)
    base_ids = {id(p) for p in base.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in top or id(p) not in base_ids}


def train_compressor(annotations: Sequence[Annotation], base_model: str, out_dir: str | Path,
                     config: TrainConfig | None = None, progress: bool = False) -> TrainResult:
    """Fine-tune ``base_model`` (a local directory or hub id of any encoder) on the
    annotations; keep the epoch with the lowest evaluation loss; save to ``out_dir``."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from ..models import resolve_device

    cfg = config or TrainConfig()
    if len(annotations) < 2:
        raise ValueError("need at least 2 annotated samples (one to train on, one to evaluate)")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForTokenClassification.from_pretrained(
        base_model, num_labels=2, id2label={v: k for k, v in LABELS.items()}, label2id=dict(LABELS),
        use_safetensors=True).to(device)
    names = trainable_names(model, cfg.train_layers)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    items = [encode(tokenizer, a, cfg.max_length) for a in annotations]
    rng.shuffle(items)
    n_eval = max(1, int(round(cfg.eval_share * len(items))))
    eval_items, train_items = items[:n_eval], items[n_eval:]
    pad = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    autocast = device.startswith("cuda") and cfg.dtype in ("auto", "bf16", "bfloat16")
    history, best, best_state, stale = [], math.inf, None, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for ids, mask, labels in _batches(train_items, cfg.batch_size, pad, rng):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total, steps = total + float(out.loss.detach()), steps + 1
        metrics = evaluate_tokens(model, eval_items, cfg.batch_size, pad, device)
        metrics.update(epoch=epoch, train_loss=total / max(1, steps))
        history.append(metrics)
        if progress:
            print(f"epoch {epoch}: {metrics}", file=sys.stderr, flush=True)
        if metrics["eval_loss"] < best - 1e-4:
            best, stale = metrics["eval_loss"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if best_state:
        model.load_state_dict(best_state, strict=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    best_epoch = min(history, key=lambda m: m["eval_loss"])["epoch"]
    result = TrainResult(str(out), best_epoch, history, len(train_items), len(eval_items))
    (out / "training.json").write_text(json.dumps({"base_model": base_model, "config": asdict(cfg),
                                                   **asdict(result)}, indent=1))
    return result


@torch.inference_mode()
def evaluate_tokens(model, items, batch_size: int, pad: int, device: str) -> dict:
    """Evaluation loss, accuracy and keep-F1 over labelled tokens."""
    model.eval()
    loss_sum, n, tp, fp, fn, correct = 0.0, 0, 0, 0, 0, 0
    for ids, mask, labels in _batches(items, batch_size, pad, None):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        valid = labels != -100
        pred = out.logits.argmax(-1).cpu()
        k = int(valid.sum())
        loss_sum, n = loss_sum + float(out.loss) * k, n + k
        correct += int((pred[valid] == labels[valid]).sum())
        tp += int(((pred == 1) & (labels == 1)).sum())
        fp += int(((pred == 1) & (labels == 0)).sum())
        fn += int(((pred == 0) & (labels == 1)).sum())
    model.train()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"eval_loss": loss_sum / max(1, n), "eval_accuracy": correct / max(1, n), "eval_keep_f1": f1}


def save_delta(model_dir: str | Path, base_model: str, train_layers: int, out_file: str | Path) -> int:
    """Save only what training changed (top layers + head, float16 safetensors) for a
    model whose base weights come from elsewhere. Returns the file's size in bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(model_dir, use_safetensors=True)
    names = trainable_names(model, train_layers)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items() if k in names}
    save_file(state, str(out_file), metadata={"base_model": base_model, "train_layers": str(train_layers)})
    return Path(out_file).stat().st_size
