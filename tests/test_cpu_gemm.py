"""oneDNN float32 linears on x86 CPUs (cpu_gemm.py), on the real SmolLM2 and NQ text.

The swap must not change what the model computes beyond float32 summation order, must
leave training (autograd) alone, and must be switchable off.
"""

from __future__ import annotations

import platform

import pytest
import torch

from lingua_integrations import cpu_gemm
from lingua_integrations.models import ModelRegistry

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available(),
    reason="oneDNN linears are used on x86-64 CPUs only",
)


@pytest.fixture(scope="module")
def loaded():
    return ModelRegistry.get_causal_lm("smollm2-135m", device="cpu", dtype="float32")


def _as_plain_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Turn the swapped layers back into plain ``nn.Linear`` in place; returns them (the
    caller swaps them again)."""
    swapped = [m for m in model.modules() if type(m) is cpu_gemm.OneDNNLinear]
    for m in swapped:
        m.__class__ = torch.nn.Linear
    return swapped


def test_the_loaded_cpu_model_runs_its_linears_through_onednn(loaded):
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_gemm.OneDNNLinear for m in linears)
    assert cpu_gemm.onednn_available()


def test_logits_match_the_default_blas_to_float32_rounding(loaded, nq_rows):
    ids = loaded.tokenizer(nq_rows[0]["text"], return_tensors="pt").input_ids[:, :300]
    with torch.inference_mode(), loaded.lock:
        fast = loaded.model(input_ids=ids, use_cache=False).logits
        swapped = _as_plain_linears(loaded.model)
        try:
            plain = loaded.model(input_ids=ids, use_cache=False).logits
        finally:
            for m in swapped:
                m.__class__ = cpu_gemm.OneDNNLinear
    # 30 layers of float32 in another summation order: far below a surprisal's 0.01 nat
    assert float((fast - plain).abs().max()) < 2e-3
    assert torch.equal(fast[0, :-1].argmax(-1), plain[0, :-1].argmax(-1))


def test_with_autograd_the_layer_is_the_plain_one():
    layer = torch.nn.Linear(16, 8)
    assert cpu_gemm.use_onednn_linears(layer) == 1 and type(layer) is cpu_gemm.OneDNNLinear
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()  # the oneDNN op has no backward: the plain forward ran
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_the_environment_variable_keeps_the_default_blas(monkeypatch):
    monkeypatch.setenv(cpu_gemm.GEMM_ENV, "default")
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    assert cpu_gemm.use_onednn_linears(layer) == 0
    assert all(type(m) is torch.nn.Linear for m in layer)
