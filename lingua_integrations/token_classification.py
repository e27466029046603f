"""LLMLingua-2: token classification with a bidirectional encoder.

A token classifier (XLM-RoBERTa, mBERT, BERT, DeBERTa, ModernBERT, ...) gives every
sub-token a keep probability; a word's probability is the mean over its sub-tokens; the
most probable words are kept in their original order. Word boundaries come from the
fast tokenizer (``word_ids`` and character offsets), for any model, never from its
name; the output is cut from the original text, so case and spacing survive.

Long inputs are cut into chunks that fit the encoder's window, preferably after a
sentence end, and all chunks of all texts of a call are classified in padded batches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .models import LoadedModel

_DIGIT = re.compile(r"\d")
_ALNUM = re.compile(r"[^\W_]")  # a letter or a digit


@dataclass
class Word:
    """One word of a text: its span in the text, its keep probability, whether it is forced."""

    start: int
    end: int
    prob: float
    forced: bool = False
    kept: bool = False
    chunk: int = 0  # which encoder window the word was classified in
    ids: list[int] = field(default_factory=list)  # its sub-token ids


@dataclass
class ClassifiedText:
    text: str
    words: list[Word] = field(default_factory=list)

    def word_text(self, w: Word) -> str:
        return self.text[w.start : w.end]

    @property
    def mean_prob(self) -> float:
        probs = [w.prob for w in self.words if not w.forced]
        return sum(probs) / len(probs) if probs else 0.0

    def compressed(self, drop_consecutive: bool = False) -> str:
        """Kept words in order, each joined to the previous kept word by the original
        whitespace when nothing between them was dropped, else by one space."""
        out: list[str] = []
        prev: Word | None = None
        prev_index = -2
        last_forced_text: str | None = None
        for i, w in enumerate(self.words):
            if not w.kept:
                continue
            piece = self.word_text(w)
            if drop_consecutive and w.forced and piece == last_forced_text:
                continue
            last_forced_text = piece if w.forced else None
            if prev is not None:
                gap = self.text[prev.end : w.start]
                if prev_index == i - 1:
                    out.append(gap)
                elif not (piece.isspace() or self.word_text(prev).isspace()):
                    out.append(" ")
            out.append(piece)
            prev, prev_index = w, i
        return "".join(out).strip(" ")


class TokenClassifier:
    """Keep probabilities per word from a token-classification model (shared, thread-safe)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 16, window: int | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.batch_size = max(1, int(batch_size))
        limit = getattr(self.tokenizer, "model_max_length", 512) or 512
        self.window = int(min(window or 512, limit if limit < 100_000 else 512, loaded.max_positions))
        tok = self.tokenizer
        self.prefix = [i for i in [tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id] if i is not None]
        self.suffix = [i for i in [tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id] if i is not None]
        keep = getattr(self.model.config, "label2id", None) or {}
        self.keep_label = int(keep.get("keep", keep.get("KEEP", 1)))

    def _chunks(self, offsets: list[tuple[int, int]], text: str, chunk_end: set[str]) -> list[tuple[int, int]]:
        """Token ranges of at most ``window - specials`` tokens, cut after the last
        sentence end (a chunk-end token, or a token followed by a newline) in reach."""
        size = self.window - len(self.prefix) - len(self.suffix)
        n, start, out = len(offsets), 0, []
        while start < n:
            end = min(n, start + size)
            if end < n:
                for j in range(end - 1, start, -1):
                    s, e = offsets[j]
                    after = text[e : offsets[j + 1][0]] if j + 1 < n else ""
                    if text[s:e] in chunk_end or ("\n" in chunk_end and "\n" in after):
                        end = j + 1
                        break
            out.append((start, end))
            start = end
        return out

    @torch.inference_mode()
    def classify(self, texts: Sequence[str], chunk_end: Sequence[str] = (".", "\n")) -> list[ClassifiedText]:
        """Word keep-probabilities of every text (mean of its sub-tokens' probabilities)."""
        ends = set(chunk_end)
        encoded = [self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        jobs = []  # (text index, token start, token end)
        for ti, (t, enc) in enumerate(zip(texts, encoded)):
            jobs += [(ti, s, e) for s, e in self._chunks([tuple(o) for o in enc.offset_mapping], t, ends)]
        token_probs = [torch.zeros(len(enc.input_ids)) for enc in encoded]
        token_chunk = [torch.zeros(len(enc.input_ids), dtype=torch.long) for enc in encoded]
        for c, (ti, s, e) in enumerate(jobs):
            token_chunk[ti][s:e] = c
        order = sorted(range(len(jobs)), key=lambda k: jobs[k][2] - jobs[k][1])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.loaded.device
        for b in range(0, len(order), self.batch_size):
            batch = [jobs[k] for k in order[b : b + self.batch_size]]
            width = max(e - s for _, s, e in batch) + len(self.prefix) + len(self.suffix)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ti, s, e) in enumerate(batch):
                seq = self.prefix + encoded[ti].input_ids[s:e] + self.suffix
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with self.loaded.lock:
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            probs = logits.float().softmax(-1)[..., self.keep_label].cpu()
            for row, (ti, s, e) in enumerate(batch):
                token_probs[ti][s:e] = probs[row, len(self.prefix) : len(self.prefix) + e - s]
        return [self._words(t, enc, p, c) for t, enc, p, c in zip(texts, encoded, token_probs, token_chunk)]

    @staticmethod
    def _words(text: str, enc, probs: torch.Tensor, chunks: torch.Tensor) -> ClassifiedText:
        """Group sub-tokens into words by ``word_ids``; a token made only of punctuation
        is a word of its own (so "Paris," keeps or drops its comma separately)."""
        words: list[Word] = []
        sums: list[list[float]] = []
        last_wid, last_punct = None, False
        probs, chunks, ids = probs.tolist(), chunks.tolist(), enc.input_ids  # plain lists: fast indexing
        for k, (wid, (s, e)) in enumerate(zip(enc.word_ids(), enc.offset_mapping)):
            piece = text[s:e]
            s += len(piece) - len(piece.lstrip())  # byte-level BPE offsets include the leading space
            if e <= s:
                continue  # a whitespace-only token: layout, not a word
            punct = not _ALNUM.search(text, s, e)
            if not words or wid is None or wid != last_wid or punct or last_punct:
                words.append(Word(s, e, 0.0, chunk=chunks[k]))
                sums.append([])
            else:
                words[-1].end = e
            sums[-1].append(probs[k])
            words[-1].ids.append(ids[k])
            last_wid, last_punct = wid, punct
        for w, ps in zip(words, sums):
            w.prob = sum(ps) / len(ps)
        return ClassifiedText(text, words)


def insert_newlines(ct: ClassifiedText) -> None:
    """Add a word for each line break between words, so "\\n" can be a force token even
    for tokenizers that treat newlines as plain whitespace."""
    words, prev_end = [], 0
    for w in ct.words:
        gap = ct.text[prev_end : w.start]
        base = prev_end
        for m in re.finditer(r"\n", gap):
            words.append(Word(base + m.start(), base + m.end(), 0.0, chunk=w.chunk))
        words.append(w)
        prev_end = w.end
    for m in re.finditer(r"\n", ct.text[prev_end:]):
        words.append(Word(prev_end + m.start(), prev_end + m.end(), 0.0, chunk=words[-1].chunk if words else 0))
    ct.words = words


def mark_forced(ct: ClassifiedText, force_tokens: Sequence[str], force_digits: bool) -> None:
    forced = set(force_tokens)
    for w in ct.words:
        piece = ct.text[w.start : w.end]
        if piece in forced or (force_digits and _DIGIT.search(piece)):
            w.forced = True


def prepare(texts: Sequence[ClassifiedText], force_tokens: Sequence[str], force_digits: bool) -> None:
    """Line breaks become words when ``"\n"`` is forced; forced words are marked."""
    for ct in texts:
        if "\n" in force_tokens:
            insert_newlines(ct)
        mark_forced(ct, force_tokens, force_digits)


def _salient(piece: str) -> bool:
    """A word with a digit or a capital letter: a name, number, date or code."""
    return any(ch.isdigit() or ch.isupper() for ch in piece)


def _order_key(ct: ClassifiedText, w: Word, prefer_salient: bool) -> float:
    """Higher = keep sooner: the keep probability, names and numbers first when preferred."""
    return w.prob + (1.0 if prefer_salient and _salient(ct.text[w.start : w.end]) else 0.0)


def fit_total(texts: Sequence[ClassifiedText], sizes: Sequence[list[int]], budget: float, prefer_salient: bool,
              tolerance: float = 0.05) -> None:
    """Move the kept words of all texts together to within ``tolerance`` of ``budget``
    target-LLM tokens: per-text rates (shifted by rank) can add up to more or less than the
    call's budget. Drops the least probable kept words, or restores the most probable dropped."""
    pool = [(ct, w, n) for ct, ws in zip(texts, sizes) for w, n in zip(ct.words, ws) if not w.forced and n > 0]
    spent = sum(n for ct, ws in zip(texts, sizes) for w, n in zip(ct.words, ws) if w.kept)
    if spent > budget * (1 + tolerance):
        for ct, w, n in sorted((x for x in pool if x[1].kept), key=lambda x: _order_key(x[0], x[1], prefer_salient)):
            if spent <= budget:
                break
            w.kept, spent = False, spent - n
    elif spent < budget * (1 - tolerance):
        for ct, w, n in sorted((x for x in pool if not x[1].kept), key=lambda x: -_order_key(x[0], x[1], prefer_salient)):
            if spent + n > budget:
                continue
            w.kept, spent = True, spent + n


def select_words(texts: Sequence[ClassifiedText], rates: Sequence[float], count,
                 prefer_salient: bool = False) -> list[list[int]]:
    """Keep, per text, the most probable words until ``rate`` of its target-LLM tokens
    (forced words first, and counted). With ``prefer_salient``, names and numbers are
    taken before any other word, budget permitting. Sets ``Word.kept``; returns each
    word's target-LLM tokens."""
    all_sizes = []
    for ct, rate in zip(texts, rates):
        known: dict[str, int] = {}
        sizes = []
        for w in ct.words:
            piece = ct.text[w.start : w.end]
            if piece not in known:
                known[piece] = 0 if piece.isspace() else max(1, count(piece))
            sizes.append(known[piece])
        all_sizes.append(sizes)
        budget = rate * sum(sizes)
        for w in ct.words:
            w.kept = w.forced
        spent = sum(s for w, s in zip(ct.words, sizes) if w.kept)
        candidates = [i for i, w in enumerate(ct.words) if not w.forced and sizes[i] > 0]  # not bare line breaks
        for i in sorted(candidates, key=lambda i: -_order_key(ct, ct.words[i], prefer_salient)):
            if spent + sizes[i] > budget and spent > 0:
                if spent >= budget:
                    break
                continue
            ct.words[i].kept = True
            spent += sizes[i]
    return all_sizes
