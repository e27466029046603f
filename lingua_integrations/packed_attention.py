"""Attention over packed rows that skips the other sequences' blocks (variable-length flash).

A packed pass (:mod:`.runner`) lays several sequences end to end in one row, each restarting
its position ids. transformers' SDPA path then builds a block-diagonal causal mask of the
row's full width and the fused kernel walks every block of it, masked ones included: on an
H100, in the 64-caller round, that attention was a third of the device time. The
variable-length flash kernel instead takes the sequences' boundaries (``cu_seqlens``) and
computes each sequence's own causal triangle only (2-3x less attention time at the widths
packing uses).

How it plugs in: :func:`install` registers :func:`packed_attention` with transformers'
``AttentionInterface`` and switches a model from ``"sdpa"`` to it. A forward that passes
``cu_seq_lens_q`` (transformers' own keyword for packed sequences, handed down to every
attention layer) gets the variable-length kernel; every other forward (KV-cache windows,
right-padded batches, probes) gets transformers' SDPA function with the same mask as before,
so nothing else changes. A forward that passes ``lingua_pooled=True`` (a pooled pass of ITPC
window steps, :mod:`.kv_pool`) attends to its streams' keys in the KV pool instead.

``cu_seqlens`` may end in repeats of the total (empty sequences): captured graphs keep a
fixed-size boundary list per shape, filled to its end that way.
"""

from __future__ import annotations

import logging

import torch

from .kv_pool import pooled_attention, stand_in

logger = logging.getLogger(__name__)

NAME = "lingua_packed"
_registered = False


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the variable-length flash kernel runs here (CUDA, half precision, flash built in)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cuda.flash_sdp_enabled() and hasattr(torch.ops.aten, "_flash_attention_forward"))


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: ``query`` ``(rows, heads, width, dim)``,
    ``key``/``value`` ``(rows, kv_heads, width, dim)``; returns ``(rows, width, heads, dim)``.
    With ``cu_seq_lens_q`` (flat boundaries of the packed sequences, over rows × width
    positions) and ``max_length_q``: each sequence attends causally to itself alone.
    Without: transformers' SDPA function, unchanged."""
    if kwargs.get("lingua_pooled"):  # a pass over new tokens with their streams' keys in the KV pool
        return pooled_attention(module, query, key, value, scaling, flash_available(query.device, query.dtype)), None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, width, dim = query.shape
    q = query.transpose(1, 2).reshape(rows * width, heads, dim)
    k = key.transpose(1, 2).reshape(rows * width, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(rows * width, value.shape[1], dim)
    longest = int(kwargs.get("max_length_q") or width)
    if flash_available(q.device, q.dtype):
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, True, False,
                                                      scale=scaling)[0]
    else:
        out = stand_in(q, k, v, cu, cu, scaling)
    return out.view(rows, width, heads, dim), None


def register() -> None:
    """Make :data:`NAME` known to transformers in this process. A config switched to it
    names it, so a process that builds a model from such a config (a host worker's
    meta-device copy) must register it first."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not _registered:
        AttentionInterface.register(NAME, packed_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # unpacked forwards keep SDPA's masks
        _registered = True


def install(model: torch.nn.Module, force: bool = False) -> bool:
    """Switch ``model`` (an SDPA transformers model) to :func:`packed_attention`; whether it did.
    Only where the flash kernel runs, unless ``force`` (tests of the layout on a CPU)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    param = next(model.parameters())
    if not force and not flash_available(param.device, param.dtype):
        return False
    try:
        register()
        model.set_attn_implementation(NAME)
    except Exception as exc:  # noqa: BLE001 - an older or newer transformers: SDPA stays
        logger.info("variable-length attention not installed (%s); packed rows use SDPA's mask", exc)
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME
