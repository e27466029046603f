"""A pooled KV cache on the device for ITPC window steps batched across callers.

A small LM on a GPU rescores each ITPC window's whole view from scratch so that the
views of concurrent calls share one device batch (:mod:`.scoring`): a 20-document call
then computes ~8k token positions where extending a KV cache would compute ~3k, because
every step recomputes the compressed prefix before its window. The pool keeps each
stream's keys and values on the device between steps instead, in a region of one
buffer per layer, so a step sends only its new tokens (the just-compressed window, as
the reference recomputes it, and the next one) and still shares the batch with other
callers: a pooled pass lays every stream's new tokens end to end, writes their keys and
values into their regions, gathers each stream's cached-plus-new keys, and runs the
variable-length flash kernel with queries shorter than keys (a causal mask aligned at
the end: each new token sees its stream's prefix and the new tokens before it).

The cache is cropped, as ITPC crops its dynamic cache, by moving a stream's ``cached``
length back: the next step writes over what follows.

On a CPU the same pass runs through an exact per-sequence SDPA stand-in (tests).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class PooledPass:
    """What the attention layers of one pooled pass read (tensors on the device).

    ``slots``: where each laid-out token's key and value are written (padding: the
    scratch slot); ``keys``: the pool slots each sequence attends to, sequence after
    sequence (padding: the scratch slot); ``cu_q`` / ``cu_k``: the sequences' boundaries
    in the laid-out tokens and in ``keys`` (empty sequences fill the fixed-size lists);
    ``max_q`` / ``max_k``: bounds on one sequence's new tokens and keys."""

    pool: "KVPool"
    slots: torch.Tensor
    keys: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(layers, key-value heads, head size)`` of a transformers causal LM's config."""
    cfg = model.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return int(cfg.num_hidden_layers), heads, head_dim


class KVPool:
    """Keys and values of many ITPC streams, one region per stream, in one buffer per layer.

    Args:
        model: the causal LM (its config gives layers, key-value heads and head size).
        capacity: token slots in all; one more, the scratch slot, takes padding's writes.
    """

    def __init__(self, model: torch.nn.Module, capacity: int) -> None:
        param = next(model.parameters())
        self.layers, heads, head_dim = _kv_shape(model)
        self.capacity = int(capacity)
        self.scratch = self.capacity
        shape = (self.layers, self.capacity + 1, heads, head_dim)
        self.k = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.v = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (start, size), by start
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bytes_per_token(model: torch.nn.Module) -> int:
        """Device memory one token slot takes (keys and values of every layer)."""
        layers, heads, head_dim = _kv_shape(model)
        return 2 * layers * heads * head_dim * next(model.parameters()).element_size()

    def allocate(self, n: int) -> int | None:
        """A region of ``n`` slots (its start), or None when the pool has no room (the
        caller then scores from scratch)."""
        n = max(1, int(n))
        with self._lock:
            for k, (start, size) in enumerate(self._free):
                if size >= n:
                    if size == n:
                        del self._free[k]
                    else:
                        self._free[k] = (start + n, size - n)
                    self._sizes[start] = n
                    return start
        return None

    def release(self, start: int) -> None:
        """Give a region back (merged with free neighbours)."""
        with self._lock:
            n = self._sizes.pop(start, None)
            if n is None:
                return
            free = sorted(self._free + [(start, n)])
            merged: list[tuple[int, int]] = []
            for s, size in free:
                if merged and merged[-1][0] + merged[-1][1] == s:
                    merged[-1] = (merged[-1][0], merged[-1][1] + size)
                else:
                    merged.append((s, size))
            self._free = merged

    @property
    def in_use(self) -> int:
        """Slots held by regions (diagnostics, tests)."""
        with self._lock:
            return sum(self._sizes.values())


def stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
             scale: float | None) -> torch.Tensor:
    """The variable-length flash kernel's result without it (a CPU, float32): each
    sequence's queries over its keys by SDPA, causal aligned at the end (with as many
    queries as keys, plain causal attention: packed rows use it too). Slow (a loop over
    sequences); it exists so the layouts are testable on any machine."""
    out = torch.zeros_like(q)
    for (a, b), (c, d) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
        if b > a:
            n, m = b - a, d - c
            mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
            qs, ks, vs = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


_active: PooledPass | None = None  # the pooled pass running now (set under the model's lock)


@contextlib.contextmanager
def active(meta: PooledPass) -> Iterator[None]:
    """Run a forward as the pooled pass ``meta``. The forward itself carries only the
    constant keyword ``lingua_pooled=True``: compiled layers guard on their keywords, and
    one object per captured shape would recompile them at every new shape."""
    global _active
    _active = meta
    try:
        yield
    finally:
        _active = None


@torch.compiler.disable  # compiled layers break around it: the pool's layer index must not specialise them
def pooled_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scaling: float | None, flash: bool) -> torch.Tensor:
    """One layer of the active pooled pass: ``query``/``key``/``value`` of the laid-out new
    tokens ``(1, heads, tokens, dim)``; writes their keys and values to the pool, attends
    each sequence's queries to its gathered keys; returns ``(1, tokens, heads, dim)``."""
    meta = _active
    if meta is None:
        raise RuntimeError("a pooled attention call outside a pooled pass (kv_pool.active)")
    layer = int(module.layer_idx)
    _, heads, width, dim = query.shape
    q = query[0].transpose(0, 1)
    pool_k, pool_v = meta.pool.k[layer], meta.pool.v[layer]
    pool_k.index_copy_(0, meta.slots, key[0].transpose(0, 1).to(pool_k.dtype))
    pool_v.index_copy_(0, meta.slots, value[0].transpose(0, 1).to(pool_v.dtype))
    k = pool_k.index_select(0, meta.keys)
    v = pool_v.index_select(0, meta.keys)
    if flash:
        out = torch.ops.aten._flash_attention_forward(q, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, 0.0,
                                                      True, False, scale=scaling)[0]
    else:
        out = stand_in(q, k, v, meta.cu_q, meta.cu_k, scaling)
    return out.view(1, width, heads, dim)
