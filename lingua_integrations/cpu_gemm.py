"""Float32 linear layers on x86 CPUs through oneDNN rather than torch's default BLAS.

Why: on a CPU a small LM's compression time is its matrix multiplies (three quarters of a
window step). torch sends a float32 ``linear`` to MKL, and MKL takes its AVX-512 code only
on Intel processors: on an AMD EPYC with AVX-512 it runs its AVX2 kernels at half the
chip's rate. oneDNN, which torch also carries (it already runs every bfloat16 matmul),
picks its kernels by the instructions the CPU has. Measured on this project's 2-core AMD
EPYC: a 400x576 by 576x1536 float32 product 3.9 ms with MKL, 1.7 ms with oneDNN; the
SmolLM2 LM head over 201 positions 88 ms against 37 ms. The arithmetic stays float32
(same inputs, float32 accumulation; results differ from MKL's only in summation order,
a few float32 roundings).

The op is ``torch.ops.mkldnn._linear_pointwise``, which torch's own compiler emits for CPU
linears; it is not a public API, so :func:`use_onednn_linears` first checks it on a probe
and leaves the model as it is if the op is missing or disagrees with ``F.linear``. Set
``LINGUA_CPU_GEMM=default`` to keep torch's default BLAS.
"""

from __future__ import annotations

import logging
import os
import platform

import torch
from torch import nn

logger = logging.getLogger(__name__)

GEMM_ENV = "LINGUA_CPU_GEMM"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward runs oneDNN's float32 GEMM. With autograd
    recording (training, gradients) it is the plain layer, since the op has no backward;
    under ``torch.compile`` too, whose CPU lowering of this op expects weights it packed
    itself (and which chooses its own GEMM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dtype != torch.float32
                or x.device.type != "cpu"):
            return super().forward(x)
        return _onednn_linear(x, self.weight, self.bias)


def onednn_available() -> bool:
    """Whether oneDNN float32 linears can replace the default BLAS here: an x86-64 CPU,
    torch built with oneDNN, the op present and agreeing with ``F.linear`` on a probe,
    and not turned off through ``LINGUA_CPU_GEMM=default``."""
    if os.environ.get(GEMM_ENV, "").strip().lower() in ("default", "mkl", "off", "0"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    return _probe()


_PROBED: bool | None = None


def _probe() -> bool:
    global _PROBED
    if _PROBED is None:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((2, 7, 64), (48, 64), (48,)))
        try:
            with torch.inference_mode():
                got = _onednn_linear(x, w, b)
                _PROBED = got.shape == (2, 7, 48) and bool(torch.allclose(got, nn.functional.linear(x, w, b),
                                                                          rtol=1e-4, atol=1e-4))
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            logger.info("oneDNN linear unavailable (%s): float32 linears use torch's default BLAS", exc)
            _PROBED = False
    return _PROBED


def use_onednn_linears(model: nn.Module) -> int:
    """Turn the plain ``nn.Linear`` layers of a float32 CPU ``model`` into
    :class:`OneDNNLinear` (same parameters, same state dict); returns how many. Other
    layer types (quantised, adapters) and models elsewhere are left alone."""
    if not onednn_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.__class__ = OneDNNLinear
            swapped += 1
    return swapped
