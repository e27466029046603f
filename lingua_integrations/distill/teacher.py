"""The teacher step: a strong model compresses text chunks by deleting words.

A teacher is a LangChain chat model (anything with ``invoke(messages)`` returning a
message) or a plain callable ``text -> compressed text``. Calls run concurrently, are
retried with exponential back-off, and each answer is appended to a JSONL file as it
arrives, so an interrupted run resumes where it stopped (answers are keyed by the
chunk's SHA-1).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..evidence import split_sentences

logger = logging.getLogger(__name__)

# the paper's instruction, in our words: deletion only
INSTRUCTION = (
    "Compress the text below by deleting words that are not needed to keep its information. "
    "Only delete words: do not reorder, change, paraphrase or add any word. "
    "Reply with the remaining words only."
)

Teacher = Callable[[str], str]


def as_teacher(model: Any, instruction: str = INSTRUCTION) -> Teacher:
    """A callable ``text -> compressed text`` from a LangChain chat model or a callable."""
    if hasattr(model, "invoke"):
        def ask(text: str) -> str:
            reply = model.invoke([("system", instruction), ("human", text)])
            content = getattr(reply, "content", reply)
            if isinstance(content, list):  # content blocks
                content = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
            return str(content)

        return ask
    if callable(model):
        return model
    raise TypeError("teacher must be a LangChain chat model (with .invoke) or a callable text -> text")


def chunk_text(text: str, count: Callable[[str], int], max_tokens: int = 512) -> list[str]:
    """Cut ``text`` into chunks of whole sentences of at most ``max_tokens`` tokens (a
    longer sentence is a chunk of its own)."""
    chunks, current, size = [], [], 0
    for s, e in split_sentences(text):
        sentence = text[s:e].strip()
        if not sentence:
            continue
        n = count(sentence)
        if current and size + n > max_tokens:
            chunks.append(" ".join(current))
            current, size = [], 0
        current.append(sentence)
        size += n
    if current:
        chunks.append(" ".join(current))
    return chunks


def _key(chunk: str) -> str:
    return hashlib.sha1(chunk.encode("utf-8")).hexdigest()


def run_teacher(chunks: Sequence[str], teacher: Any, cache: str | Path | None = None, *, concurrency: int = 8,
                retries: int = 3, backoff: float = 1.0, progress: bool = False) -> list[str | None]:
    """The teacher's compression of every chunk (``None`` where every retry failed).

    ``cache``: JSONL file of answers so far; chunks already there are not asked again.
    """
    ask = as_teacher(teacher)
    done: dict[str, str] = {}
    path = Path(cache) if cache else None
    if path and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row["compressed"]
    todo = [c for c in dict.fromkeys(chunks) if _key(c) not in done]
    lock = threading.Lock()

    def one(chunk: str) -> None:
        for attempt in range(retries + 1):
            try:
                answer = ask(chunk)
                break
            except Exception as exc:  # noqa: BLE001 - a remote model fails in many ways
                if attempt == retries:
                    logger.warning("teacher failed on a chunk after %d tries: %s", retries + 1, exc)
                    return
                time.sleep(backoff * 2 ** attempt)
        with lock:
            done[_key(chunk)] = answer
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": _key(chunk), "compressed": answer}, ensure_ascii=False) + "\n")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="teacher", unit="chunk")
    with cf.ThreadPoolExecutor(max(1, concurrency)) as pool:
        for _ in cf.as_completed([pool.submit(one, c) for c in todo]):
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return [done.get(_key(c)) for c in chunks]
