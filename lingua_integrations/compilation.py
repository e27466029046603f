"""Regional compilation of a causal LM for the device runner.

A 135M-parameter LM on a GPU spends most of a forward pass outside its matrix
multiplications: each decoder layer runs ~30 small elementwise kernels (RMSNorm in
float32, rotary embeddings, SiLU, residual adds), each reading and writing the whole
activation. ``torch.compile`` fuses them. Compiling each decoder layer (the
"regional" recipe: the layers share one compiled graph, so it costs one compilation,
not thirty) with dynamic shapes, plus the final norm and the surprisal itself, made a
captured CUDA graph of the SmolLM2 shape ~2x faster on an H100 (3k tokens: 9.4 ->
4.4 ms; 16k tokens: 44 -> 20 ms) for a one-off ~15 s compilation per process (less
with inductor's on-disk cache).

A big model (7B) on a GPU is bound by its matrix multiplications, yet a third of its
device time was still those small kernels. Its ITPC windows extend a KV cache, and a
whole layer compiled with a cache object specialises on the layer's index (32
compilations), so for such models only the parts of a layer that never see the cache
are compiled (its norms and MLP, :func:`cache_free_regions`): one compilation serves
every layer, cached passes and captured window graphs included. The attention's rotary
embedding (~10 elementwise kernels over the queries and keys per layer) is fused too, by
compiling the modeling module's ``apply_rotary_pos_emb`` function (:func:`fuse_rotary`):
a function of tensors alone, it compiles once whatever the cache.

``TORCH_COMPILE_DISABLE=1`` turns compilation off, as it turns off ``torch.compile``
everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Callable

import torch

logger = logging.getLogger(__name__)
_compiled_any = False  # whether compile_regions ever ran in this process


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` (CUDA needs Triton)."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - a torch without the helper
        return False
    return has_triton()


def _decoder_layers(model: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module | None]:
    """The decoder's repeated layers and its final norm (none for a model without a
    transformers-style decoder with ``layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return [], None
    norm = getattr(decoder, "norm", None)
    return list(layers), norm if isinstance(norm, torch.nn.Module) else None


def regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules compiled one by one: the decoder's repeated layers and its final norm
    (empty for a model without a transformers-style decoder with ``layers``)."""
    layers, norm = _decoder_layers(model)
    return layers + ([norm] if layers and norm is not None else [])


def cache_free_regions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The parts of each decoder layer that never see a KV cache (its norms and its MLP:
    every child with weights but the attention), and the final norm.

    For models whose passes also extend a KV cache (big models' ITPC windows): a whole
    layer given a cache object makes dynamo specialise on the layer's index, 32
    compilations for a 7B model, while these parts compile once for every layer and
    every pass, cached or not."""
    layers, norm = _decoder_layers(model)
    found = [child for layer in layers for child in layer.children()  # by class: "post_attention_layernorm"
             if "attention" not in type(child).__name__.lower() and next(child.parameters(), None) is not None]
    return found + ([norm] if found and norm is not None else [])


_ROTARY = "apply_rotary_pos_emb"  # the rotary function's name in transformers' Llama-family modeling modules


def fuse_rotary(model: torch.nn.Module) -> Callable[[], None]:
    """Route the rotary embedding of ``model``'s modeling module through a compiled copy.

    transformers' attention calls its module's ``apply_rotary_pos_emb`` by name, so the
    function is replaced *in that module* (every model of the same architecture in this
    process, ours or not, gets the fused kernels for CUDA tensors; the arithmetic is
    unchanged, each value rounded once instead of after every step). The replacement
    calls the original for CPU tensors, while dynamo traces it (a compiled whole layer
    compiles it itself) and, for good, after the compiled copy fails once. Returns a
    function that puts the original back (nothing when the module has no such function).
    """
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, _ROTARY, None)
    if original is None or not callable(original):
        return lambda: None
    if getattr(original, "_lingua_fused", False):
        return lambda: None  # already routed (another model of this architecture)
    fused = torch.compile(original, dynamic=True)
    state = {"on": True}

    @functools.wraps(original)
    def apply_rotary(q, k, *args, **kwargs):
        if state["on"] and isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling():
            try:
                return fused(q, k, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported input: the original's kernels
                state["on"] = False
                logger.warning("compiled rotary embedding failed (%s); using %s's own", exc, module.__name__)
        return original(q, k, *args, **kwargs)

    apply_rotary._lingua_fused = True
    setattr(module, _ROTARY, apply_rotary)
    logger.info("rotary embedding of %s compiled (one-off)", module.__name__)

    def undo() -> None:
        if getattr(module, _ROTARY, None) is apply_rotary:
            setattr(module, _ROTARY, original)

    return undo


def compile_regions(model: torch.nn.Module, which: str = "layers") -> Callable[[], None]:
    """Compile ``model``'s :func:`regions` (``which="layers"``) or its
    :func:`cache_free_regions` (``"cache-free"``) in place, for any batch shape. Returns a
    function that puts back the ones compiled here (after a compilation error; nothing
    when the model has no such regions). Compilation itself happens on the next forward
    pass. ``"cache-free"`` also fuses the rotary embedding (:func:`fuse_rotary`), which a
    whole compiled layer fuses anyway."""
    if which not in ("layers", "cache-free"):
        raise ValueError(f"which must be 'layers' or 'cache-free', not {which!r}")
    chosen = regions(model) if which == "layers" else cache_free_regions(model)
    found = [m for m in chosen if m._compiled_call_impl is None]
    if not found:
        return lambda: None
    global _compiled_any
    _compiled_any = True
    logger.info("compiling %d %s decoder regions of %s (one-off)", len(found), which, type(model).__name__)
    for module in found:
        module.compile(dynamic=True)
    unfuse = fuse_rotary(model) if which == "cache-free" else (lambda: None)

    def undo() -> None:
        for module in found:
            module._compiled_call_impl = None  # what Module.compile set; None is the eager call
        unfuse()

    return undo


def uncompiled(model: torch.nn.Module | None = None):
    """Context in which compiled code runs as plain eager code: all of it, or, given a
    ``model``, only where that model's whole decoder layers are compiled. For passes that
    carry a KV cache (the CPU's ITPC, big models' static windows, or a small model forced
    onto them): a cache object makes dynamo specialise each layer on its index, recompile
    up to its limit, and, inside a CUDA graph capture, compile while capturing, which
    fails. Cache-free regions (:func:`cache_free_regions`) need none of this."""
    if not _compiled_any:  # nothing compiled in this process: no need to load dynamo (~1-2 s)
        return contextlib.nullcontext()
    if model is not None:
        layers, _ = _decoder_layers(model)
        if not layers or layers[0]._compiled_call_impl is None:
            return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def no_recompiling():
    """Context in which a compiled function that would need a new compilation raises
    instead: around a CUDA graph capture, where compiling breaks the capture."""
    return torch.compiler.set_stance("fail_on_recompile")


@functools.lru_cache(maxsize=1)
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled for any input shape (one compiled function per process)."""
    return torch.compile(fn, dynamic=True)
