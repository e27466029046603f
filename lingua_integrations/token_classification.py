"""LLMLingua-2: token classification with a bidirectional encoder.

A token classifier (XLM-RoBERTa, mBERT, BERT, DeBERTa, ModernBERT, ...) gives every
sub-token a keep probability; a word's probability is the mean over its sub-tokens; the
most probable words are kept in their original order. Word boundaries come from the
fast tokenizer (``word_ids`` and character offsets), for any model, never from its
name; the output is cut from the original text, so case and spacing survive.

Long inputs are cut into chunks that fit the encoder's window, preferably after a
sentence end, and all chunks of all texts of a call are classified in padded batches
(:mod:`.classifier_runner`; on a GPU, captured graphs fed group by group while the rest
of a long text is still being tokenized).

The encoder's forward pass is the only real work, so everything around it is array
code: a text's words are parallel numpy arrays (no object per word), grouping, forcing,
selection and the budget fit are vectorised, long texts are tokenized in pieces in
parallel, and the per-word analysis runs on the CPU while the device classifies.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Sequence

import numpy as np
import torch

from .models import LoadedModel
from .units import code_points, next_flagged, prefix_counts

PIECE_CHARS = 8192  # texts longer than this are tokenized in pieces, in parallel threads
GPU_BATCH_TOKENS = 65536  # padded tokens per encoder pass on a GPU (few passes: launches cost)
# streaming: the later pieces of a text are tokenized in a thread (the Rust tokenizer releases the GIL)
_TOKENIZE = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lingua-tokenize")

_ASCII = [chr(i) for i in range(128)]
_ASCII_TABLES = {
    name: np.array([getattr(c, name)() for c in _ASCII], dtype=bool)
    for name in ("isspace", "isalnum", "isdigit", "isupper")
}


def char_flags(text: str, name: str) -> np.ndarray:
    """``str.<name>()`` of every character of ``text`` as a bool array (ASCII by table,
    other characters once per distinct code point)."""
    cp = code_points(text)
    out = np.zeros(len(cp), dtype=bool)
    ascii_ = cp < 128
    out[ascii_] = _ASCII_TABLES[name][cp[ascii_]]
    if not ascii_.all():
        rest = ~ascii_
        distinct, inverse = np.unique(cp[rest], return_inverse=True)
        out[rest] = np.array([getattr(chr(c), name)() for c in distinct.tolist()], dtype=bool)[inverse]
    return out


@dataclass
class ClassifiedText:
    """A text's words as parallel arrays, one entry per word: its character span, keep
    probability, the encoder window it was classified in, its sub-token ids
    (``token_ids[tok_lo[k]:tok_hi[k]]``; none for inserted line-break words), and the
    forced / kept flags the selection sets."""

    text: str
    starts: np.ndarray
    ends: np.ndarray
    probs: np.ndarray
    chunks: np.ndarray
    tok_lo: np.ndarray
    tok_hi: np.ndarray
    token_ids: np.ndarray
    forced: np.ndarray | None = None
    kept: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.starts)
        self.forced = np.zeros(n, dtype=bool) if self.forced is None else self.forced
        self.kept = np.zeros(n, dtype=bool) if self.kept is None else self.kept
        self._texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def words(self) -> list[str]:
        """Each word's text (computed once)."""
        if self._texts is None or len(self._texts) != len(self):
            t = self.text
            self._texts = [t[s:e] for s, e in zip(self.starts.tolist(), self.ends.tolist())]
        return self._texts

    def _permute(self, order: np.ndarray) -> None:
        for name in ("starts", "ends", "probs", "chunks", "tok_lo", "tok_hi", "forced", "kept"):
            setattr(self, name, getattr(self, name)[order])
        if self._texts is not None and len(self._texts) == len(order):
            self._texts = [self._texts[k] for k in order.tolist()]
        else:
            self._texts = None

    def set_token_probs(self, token_probs: np.ndarray) -> None:
        """Each word's keep probability: the mean over its sub-tokens' (``token_probs``, one
        per entry of ``token_ids``); words without sub-tokens (inserted line breaks) keep 0."""
        probs = np.zeros(len(self))
        has = np.flatnonzero(self.tok_hi > self.tok_lo)
        if len(has):  # the words with sub-tokens partition the tokens, in order
            sums = np.add.reduceat(token_probs.astype(np.float64), self.tok_lo[has])
            probs[has] = sums / (self.tok_hi[has] - self.tok_lo[has])
        self.probs = probs

    @property
    def mean_prob(self) -> float:
        probs = self.probs[~self.forced]
        return float(probs.mean()) if len(probs) else 0.0

    def any_char(self, name: str) -> np.ndarray:
        """Per word: does it contain a character with ``str.<name>()`` true?"""
        c = prefix_counts(char_flags(self.text, name))
        return c[self.ends] > c[self.starts]

    def compressed(self, drop_consecutive: bool = False) -> str:
        """Kept words in order, each joined to the previous kept word by the original
        whitespace when nothing between them was dropped, else by one space."""
        idx = np.flatnonzero(self.kept)
        if not len(idx):
            return ""
        text = self.text
        pieces = [text[a:b] for a, b in zip(self.starts[idx].tolist(), self.ends[idx].tolist())]
        if drop_consecutive:  # a forced word right after the same forced word (kept) goes
            f = self.forced[idx]
            same = np.array([a == b for a, b in zip(pieces[1:], pieces[:-1])], dtype=bool)
            keep = ~np.concatenate([[False], f[1:] & f[:-1] & same])
            idx = idx[keep]
            pieces = [w for w, k in zip(pieces, keep.tolist()) if k]
        space = np.fromiter(map(str.isspace, pieces), dtype=bool, count=len(pieces))
        adjacent = (idx[1:] == idx[:-1] + 1).tolist()
        join_space = (~(space[1:] | space[:-1])).tolist()
        gaps = [text[a:b] if adj else " " if js else ""
                for a, b, adj, js in zip(self.ends[idx[:-1]].tolist(), self.starts[idx[1:]].tolist(), adjacent, join_space)]
        return (pieces[0] + "".join(chain.from_iterable(zip(gaps, pieces[1:])))).strip(" ")


def _pieces(text: str, size: int = PIECE_CHARS) -> list[int]:
    """Start offsets of pieces of about ``size`` characters, cut after a line break (else
    after a space) so no word is split; one piece when there is no whitespace to cut at."""
    starts, start, n = [0], 0, len(text)
    while n - start > size:
        cut = text.rfind("\n", start + size // 2, start + size)
        if cut < 0:
            cut = text.rfind(" ", start + size // 2, start + size)
        if cut < 0:
            break
        start = cut + 1
        starts.append(start)
    return starts


def _stream_groups(n: int) -> list[int]:
    """How many of ``n`` pieces each tokenizer call takes when streaming: a third first
    (tokenized alone, in the calling thread: its windows start the device soon), then the
    rest in one call (all its pieces in parallel) in a thread while the device works on the
    first. A third: the device's work on it (~2.8 ms per 8k-character piece on an H100 for
    the XLM-R-large shape) about covers tokenizing the rest (~1.5 ms per piece on 16
    cores), so the device barely waits. Two or fewer pieces: one call."""
    if n < 3:
        return [n] if n else []
    first = max(1, round(n / 3))
    return [first, n - first]


class PendingWords:
    """The words of a ``TokenClassifier.submit`` call, whose keep probabilities the device is
    still computing: ``texts`` can be worked on (line breaks inserted, words forced and
    counted) before ``wait`` fills in ``probs``."""

    def __init__(self, texts: list[ClassifiedText], flat: torch.Tensor | None, base: np.ndarray,
                 valids: list[np.ndarray]) -> None:
        self.texts = texts
        self._flat, self._base, self._valids = flat, base, valids

    def wait(self) -> list[ClassifiedText]:
        """Wait for the device and set every word's keep probability; returns ``texts``."""
        if self._flat is not None:
            probs = self._flat.float().cpu().numpy()
            for i, (ct, valid) in enumerate(zip(self.texts, self._valids)):
                ct.set_token_probs(probs[self._base[i] : self._base[i + 1]][valid])
            self._flat = None
        return self.texts


class TokenClassifier:
    """Keep probabilities per word from a token-classification model (shared, thread-safe)."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 16, window: int | None = None,
                 stream: bool | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        limit = getattr(self.tokenizer, "model_max_length", 512) or 512
        self.window = int(min(window or 512, limit if limit < 100_000 else 512, loaded.max_positions))
        # eagerly on a GPU each pass costs its kernel launches: as many windows per pass as a token budget allows
        on_gpu = str(loaded.device).startswith("cuda")
        self.batch_size = max(1, int(batch_size), GPU_BATCH_TOKENS // self.window if on_gpu else 1)
        tok = self.tokenizer
        self.prefix = [i for i in [tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id] if i is not None]
        self.suffix = [i for i in [tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id] if i is not None]
        self.runner = loaded.keep_prob_runner()
        self.stream = stream  # tokenize and launch in groups (None: when launches are cheap, i.e. CUDA graphs)

    def _encode_pieces(self, texts: Sequence[str], pieces: Sequence[tuple[int, int, int]]):
        """(ids, offsets (n, 2) into the text, word ids within the piece) of each piece
        ``(text index, start, end)``, all in one tokenizer call (the fast tokenizer runs
        it in threads)."""
        if not pieces:
            return []
        enc = self.tokenizer([texts[ti][s:e] for ti, s, e in pieces], add_special_tokens=False,
                             return_offsets_mapping=True)
        out = []
        for j, (_, s, _) in enumerate(pieces):
            ids, offsets, wids = enc["input_ids"][j], enc["offset_mapping"][j], enc.word_ids(j)
            n = len(ids)
            out.append((np.array(ids, dtype=np.int64),
                        np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * n).reshape(-1, 2) + s,
                        np.array(wids if None not in wids else [-1 if w is None else w for w in wids], dtype=np.int64)))
        return out

    def _chunks(self, offsets: np.ndarray, text: str, chunk_end: set[str], start: int = 0,
                final: bool = True, cp: np.ndarray | None = None) -> tuple[list[tuple[int, int]], int]:
        """Token ranges of at most ``window - specials`` tokens from token ``start``, cut after
        the last sentence end (a chunk-end token, or a token followed by a newline) in reach;
        and where the next range starts. With ``final=False`` more tokens of the text are to
        come: a range is only decided once the tokens it could reach are all here. ``cp``:
        the text's code points, when the caller has them."""
        size = self.window - len(self.prefix) - len(self.suffix)
        n = len(offsets)
        if n <= start:
            return [], start
        s, e = offsets[start:, 0], offsets[start:, 1]
        cp = code_points(text) if cp is None else cp
        first = cp[np.minimum(s, max(len(cp) - 1, 0))] if len(cp) else np.zeros(len(s), dtype=np.uint32)
        is_end = np.zeros(len(s), dtype=bool)
        for t in chunk_end:
            if not t:  # matches an empty token, as a string test would
                is_end |= e == s
                continue
            same = (e - s == len(t)) & (first == ord(t[0]))  # one character: that is the test
            if len(t) > 1:
                for j in np.flatnonzero(same).tolist():
                    same[j] = text[s[j] : e[j]] == t
            is_end |= same
        if "\n" in chunk_end:  # a newline in the gap before the next token
            nl = prefix_counts(cp == ord("\n"))
            is_end[:-1] |= nl[np.maximum(s[1:], e[:-1])] > nl[e[:-1]]
        ends = np.flatnonzero(is_end) + start
        out = []
        while start < n:
            end = min(n, start + size)
            if end < n:
                k = int(np.searchsorted(ends, end - 1, side="right")) - 1
                if k >= 0 and ends[k] > start:
                    end = int(ends[k]) + 1
            elif not final:
                break
            out.append((start, end))
            start = end
        return out, start

    def classify(self, texts: Sequence[str], chunk_end: Sequence[str] = (".", "\n")) -> list[ClassifiedText]:
        """Word keep-probabilities of every text (mean of its sub-tokens' probabilities)."""
        return self.submit(texts, chunk_end).wait()

    @torch.inference_mode()
    def submit(self, texts: Sequence[str], chunk_end: Sequence[str] = (".", "\n")) -> PendingWords:
        """Start classifying ``texts``: their words are ready on return, their keep
        probabilities after ``wait()``. On a GPU the encoder runs in between, so a caller's
        probability-free work on the words (forcing, counting) costs no time.

        Long texts are tokenized in pieces (cut at line breaks). With cheap launches (CUDA
        graphs) the first third of the pieces is tokenized first and its windows go to the
        device at once, so the encoder starts while the rest is still being tokenized
        (:func:`_stream_groups`); otherwise all pieces go in one tokenizer call."""
        ends = set(chunk_end)
        cuts = [_pieces(t) for t in texts]
        pieces = [(ti, s, e) for ti, (t, c) in enumerate(zip(texts, cuts)) for s, e in zip(c, c[1:] + [len(t)])]
        last_piece = {ti: k for k, (ti, _, _) in enumerate(pieces)}
        stream = self.runner.graphs if self.stream is None else self.stream
        groups, done = [], 0
        for size in _stream_groups(len(pieces)) if stream else [len(pieces)]:
            groups.append(pieces[done : done + size])
            done += size
        # the first group is tokenized here, alone (nothing competes with it for cores); the
        # rest in a thread while the first group's windows go to the device
        first = self._encode_pieces(texts, groups[0]) if groups else []
        futures = [_TOKENIZE.submit(self._encode_pieces, texts, g) for g in groups[1:]]
        encoded_groups = chain([first], (f.result() for f in futures))
        parts: list[list[tuple]] = [[] for _ in texts]  # per text: its pieces' (ids, offsets, word ids)
        next_word = [0] * len(texts)
        next_token = [0] * len(texts)  # where each text's next window starts
        jobs, launched = [], []  # windows (text index, token start, token end); device results
        code_pts: dict[int, np.ndarray] = {}
        done = 0
        pre, suf = len(self.prefix), len(self.suffix)
        for group, encoded_group in zip(groups, encoded_groups):
            for (ti, _, _), (ids, offsets, wids) in zip(group, encoded_group):
                parts[ti].append((ids, offsets, np.where(wids >= 0, wids + next_word[ti], -1)))
                next_word[ti] += int(wids.max()) + 1 if len(wids) else 0
            done += len(group)
            seqs = []
            for ti in dict.fromkeys(ti for ti, _, _ in group):
                offsets = np.concatenate([p[1] for p in parts[ti]])
                cp = code_pts.get(ti)
                if cp is None:
                    cp = code_pts[ti] = code_points(texts[ti])
                found, next_token[ti] = self._chunks(offsets, texts[ti], ends, next_token[ti], last_piece[ti] < done, cp)
                ids = np.concatenate([p[0] for p in parts[ti]]) if found else None
                for s, e in found:
                    jobs.append((ti, s, e))
                    seqs.append(np.concatenate([self.prefix, ids[s:e], self.suffix]).astype(np.int64))
            if seqs:  # on the device; not waited for
                launched.append(self.runner.launch(seqs, pre, suf, self.batch_size))
        empty = (np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64))
        encoded = [tuple(np.concatenate([p[j] for p in ps]) for j in range(3)) if ps else empty for ps in parts]
        base = np.cumsum([0] + [len(ids) for ids, _, _ in encoded])
        token_chunk = np.zeros(int(base[-1]), dtype=np.int64)
        for c, (ti, s, e) in enumerate(jobs):
            token_chunk[base[ti] + s : base[ti] + e] = c
        out, valids = [], []
        for i, (t, enc) in enumerate(zip(texts, encoded)):  # word analysis overlaps the device work
            valid, first, starts, ends_, chunks = self._words(t, enc, token_chunk[base[i] : base[i + 1]])
            n = int(valid.sum())
            ct = ClassifiedText(t, starts, ends_, np.zeros(len(first)), chunks, first, np.append(first[1:], n),
                                enc[0][valid])
            out.append(ct)
            valids.append(valid)
        # windows were launched in text order and each covers its tokens in order: together, every token once
        flat = (torch.cat(launched) if len(launched) > 1 else launched[0]) if launched else None
        return PendingWords(out, flat, base, valids)

    @staticmethod
    def _words(text: str, enc, chunks: np.ndarray):
        """Group sub-tokens into words by ``word_ids``; a token made only of punctuation
        is a word of its own (so "Paris," keeps or drops its comma separately); a
        whitespace-only token is layout, not a word. Returns the valid tokens' mask, each
        word's first valid token, and the words' spans and chunks."""
        _, offsets, wids = enc
        if not len(offsets):
            empty = np.zeros(0, dtype=np.int64)
            return np.zeros(0, dtype=bool), empty, empty, empty, empty
        space = char_flags(text, "isspace")
        # first non-space position at or after each character (byte-level BPE offsets include the leading space)
        nxt = np.append(next_flagged(~space), len(text))
        s, e = offsets[:, 0], offsets[:, 1]
        s = np.minimum(nxt[s], np.maximum(e, s))
        valid = e > s
        alnum = prefix_counts(char_flags(text, "isalnum"))
        s, e, w = s[valid], e[valid], wids[valid]
        punct = alnum[e] == alnum[s]
        new = np.ones(len(s), dtype=bool)
        new[1:] = (w[1:] < 0) | (w[1:] != w[:-1]) | punct[1:] | punct[:-1]
        new[0] = True
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(s)) - 1
        return valid, first, s[first], e[last], chunks[valid][first]


def insert_newlines(ct: ClassifiedText) -> None:
    """Add a word for each line break outside the words, so "\\n" can be a force token
    even for tokenizers that treat newlines as plain whitespace."""
    text = ct.text
    nl = np.flatnonzero(code_points(text) == ord("\n"))
    if not len(nl):
        return
    inside = np.searchsorted(ct.starts, nl, side="right") - 1  # the word starting at or before it
    covered = (inside >= 0) & (nl < ct.ends[np.maximum(inside, 0)]) if len(ct) else np.zeros(len(nl), dtype=bool)
    nl = nl[~covered]
    if not len(nl):
        return
    n = len(nl)
    nxt = np.minimum(np.searchsorted(ct.starts, nl), max(len(ct) - 1, 0))  # chunk of the next word (else the last)
    chunk = ct.chunks[nxt] if len(ct) else np.zeros(n, dtype=np.int64)
    empty = np.zeros(n, dtype=np.int64)
    texts = ct._texts + ["\n"] * n if ct._texts is not None and len(ct._texts) == len(ct) else None
    for name, extra in (("starts", nl), ("ends", nl + 1), ("probs", np.zeros(n)), ("chunks", chunk),
                        ("tok_lo", empty), ("tok_hi", empty), ("forced", np.zeros(n, dtype=bool)),
                        ("kept", np.zeros(n, dtype=bool))):
        setattr(ct, name, np.concatenate([getattr(ct, name), extra.astype(getattr(ct, name).dtype)]))
    ct._texts = texts
    ct._permute(np.argsort(ct.starts, kind="stable"))


def mark_forced(ct: ClassifiedText, force_tokens: Sequence[str], force_digits: bool) -> None:
    """A word is forced when its text is one of ``force_tokens`` (or, with ``force_digits``,
    contains a digit). Matched on the words' spans: only candidates of the right length and
    first character are compared as strings."""
    ct.forced = np.zeros(len(ct), dtype=bool)
    if force_tokens and len(ct):
        cp = code_points(ct.text)
        first = cp[np.minimum(ct.starts, len(cp) - 1)] if len(cp) else np.zeros(len(ct), dtype=np.uint32)
        length = ct.ends - ct.starts
        for t in set(force_tokens):
            same = (length == len(t)) & ((first == ord(t[0])) if t else True)
            if len(t) > 1:
                for k in np.flatnonzero(same).tolist():
                    same[k] = ct.text[ct.starts[k] : ct.ends[k]] == t
            ct.forced |= same
    if force_digits and len(ct):
        ct.forced |= ct.any_char("isdigit")


def prepare(texts: Sequence[ClassifiedText], force_tokens: Sequence[str], force_digits: bool) -> None:
    """Line breaks become words when ``"\n"`` is forced; forced words are marked."""
    for ct in texts:
        if "\n" in force_tokens:
            insert_newlines(ct)
        mark_forced(ct, force_tokens, force_digits)


def _order_key(ct: ClassifiedText, prefer_salient: bool) -> np.ndarray:
    """Higher = keep sooner: the keep probability, plus 1 for a word with a digit or a
    capital letter (a name, number, date or code) when those are preferred."""
    if not prefer_salient or not len(ct):
        return ct.probs
    return ct.probs + (ct.any_char("isdigit") | ct.any_char("isupper"))


def count_distinct(words: Sequence[str], count: Callable[[str], int], space: int = 0) -> np.ndarray:
    """Target-LLM tokens of each word, counted once per distinct word (at least 1;
    ``space`` for a whitespace-only word); a ``TokenCounter`` remembers them across calls."""
    distinct = list(dict.fromkeys(words))
    many = getattr(count, "words", None)
    counted = many(distinct) if many is not None else [count(w) for w in distinct]
    known = {w: space if w.isspace() else max(1, n) for w, n in zip(distinct, counted)}
    return np.fromiter(map(known.__getitem__, words), dtype=np.int64, count=len(words))


def greedy_take(sizes: np.ndarray, room: float, first_always: bool = False) -> np.ndarray:
    """Which items (already in preference order) a greedy fill takes: each item that still
    fits in ``room``, skipping those that do not, until the room is spent. With
    ``first_always``, the first item is taken even when it alone is too big."""
    take = np.zeros(len(sizes), dtype=bool)
    if not len(sizes):
        return take
    prefix = np.cumsum(sizes)
    k = int(np.searchsorted(prefix, room, side="right"))  # the prefix that fits
    if first_always and k == 0:
        k = 1
    take[:k] = True
    spent = float(prefix[k - 1]) if k else 0.0
    smallest_after = np.minimum.accumulate(sizes[::-1])[::-1]  # the smallest item from j on
    for j in range(k, len(sizes)):  # the rest: a short scan for items that still fit
        if spent >= room or room - spent < smallest_after[j]:  # spent, or nothing from here on fits
            break
        if spent + sizes[j] <= room:
            take[j] = True
            spent += sizes[j]
    return take


def fit_total(texts: Sequence[ClassifiedText], sizes: Sequence[np.ndarray], budget: float, prefer_salient: bool,
              tolerance: float = 0.05) -> None:
    """Move the kept words of all texts together to within ``tolerance`` of ``budget``
    target-LLM tokens: per-text rates (shifted by rank) can add up to more or less than the
    call's budget. Drops the least probable kept words, or restores the most probable dropped."""
    if not texts:
        return
    key = np.concatenate([_order_key(ct, prefer_salient) for ct in texts])
    size = np.concatenate(sizes).astype(np.float64)
    kept = np.concatenate([ct.kept for ct in texts])
    pool = ~np.concatenate([ct.forced for ct in texts]) & (size > 0)
    spent = float(size[kept].sum())
    if spent > budget * (1 + tolerance):
        cand = np.flatnonzero(pool & kept)
        cand = cand[np.argsort(key[cand], kind="stable")]  # least probable first
        excess = np.cumsum(size[cand])
        k = int(np.searchsorted(excess, spent - budget, side="left")) + 1  # drop until within budget
        kept[cand[:k]] = False
    elif spent < budget * (1 - tolerance):
        cand = np.flatnonzero(pool & ~kept)
        cand = cand[np.argsort(-key[cand], kind="stable")]  # most probable first
        kept[cand[greedy_take(size[cand], budget - spent)]] = True
    bounds = np.cumsum([0] + [len(ct) for ct in texts])
    for ct, a, b in zip(texts, bounds[:-1], bounds[1:]):
        ct.kept = kept[a:b]


def select_words(texts: Sequence[ClassifiedText], rates: Sequence[float], all_sizes: Sequence[np.ndarray],
                 prefer_salient: bool = False) -> None:
    """Keep, per text, the most probable words until ``rate`` of its target-LLM tokens
    (``all_sizes``: each word's, from :func:`count_distinct`; forced words first, and
    counted). With ``prefer_salient``, names and numbers are taken before any other word,
    budget permitting. Sets ``kept``."""
    for ct, rate, sizes in zip(texts, rates, all_sizes):
        budget = rate * float(sizes.sum())
        kept = ct.forced.copy()
        spent = float(sizes[kept].sum())
        cand = np.flatnonzero(~ct.forced & (sizes > 0))  # not bare line breaks
        cand = cand[np.argsort(-_order_key(ct, prefer_salient)[cand], kind="stable")]
        kept[cand[greedy_take(sizes[cand], budget - spent, first_always=spent == 0)]] = True
        ct.kept = kept
