"""Model resolution and the process-wide registry, on the real embedded model."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from lingua_integrations.models import (
    ModelRegistry, cache_dir, materialize_embedded, resolve_device, resolve_dtype, resolve_model_path,
)


def test_alias_resolves_to_cached_safetensors_directory(engine):
    path = materialize_embedded("smollm2-135m")
    assert path.is_relative_to(cache_dir())
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # plain float32 weights now
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # readable by transformers 4.x too
    t = time.perf_counter()
    again = materialize_embedded("smollm2-135m")
    assert again == path and time.perf_counter() - t < 1.0  # no second conversion


def test_registry_shares_one_model_per_key(engine):
    a = ModelRegistry.get_causal_lm("smollm2-135m", "cpu", "float32")
    b = ModelRegistry.get_causal_lm("SmolLM2-135M", "cpu", torch.float32)
    c = ModelRegistry.get_causal_lm("smollm2-135m", "cpu", "float32", trust_remote_code=False)  # a default, spelled out
    assert a is b is c is engine.loaded
    assert a.model.dtype == torch.float32 and a.device == "cpu"


def test_local_directory_loads_like_a_hub_checkout(engine, tmp_path):
    local = tmp_path / "my-model"
    shutil.copytree(materialize_embedded("smollm2-135m"), local)
    loaded = ModelRegistry.get_causal_lm(str(local), "cpu", "float32")
    assert loaded.model is not engine.loaded.model
    ids = loaded.tokenizer("Paris is the capital of France.").input_ids
    with torch.no_grad():
        mine = loaded.model(torch.tensor([ids])).logits
        theirs = engine.loaded.model(torch.tensor([ids])).logits
    torch.testing.assert_close(mine, theirs)


def test_hub_id_not_available_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest also sets huggingface_hub's constant, read at import
    with pytest.raises(ValueError, match="huggingface-cli download|local directory"):
        ModelRegistry.get_causal_lm("NousResearch/Llama-2-7b-hf", "cpu", "float32")


def test_pickle_checkpoints_need_opt_in(engine, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    d = tmp_path / "pickled"
    d.mkdir()
    tiny.config.save_pretrained(d)
    torch.save(tiny.state_dict(), d / "pytorch_model.bin")  # a pickle checkpoint, as old repos ship
    engine.tokenizer.save_pretrained(d)
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(ValueError, match="Could not load"):
        ModelRegistry.get_causal_lm(str(d), "cpu", "float32")
    loaded = ModelRegistry.get_causal_lm(str(d), "cpu", "float32", allow_pickle=True)
    assert loaded.model.config.hidden_size == 32


@pytest.mark.parametrize("bad", ["gpu", "tpu:0"])
def test_bad_device_is_a_value_error(bad):
    with pytest.raises(ValueError, match="device"):
        resolve_device(bad)


def test_auto_device_and_dtype_on_cpu_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16  # the scorer: float16 keeps surprisals faithful
    assert resolve_dtype("auto", "cuda", "token-classification") == torch.bfloat16
    assert resolve_dtype("auto", "cpu", "token-classification") == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", "cpu")


def test_float16_overflow_falls_back_to_bfloat16(caplog):
    """A model whose activations leave float16's range (as some bf16-trained models' do)
    gives non-finite logits in float16: the auto dtype detects it and loads bfloat16."""
    from lingua_integrations.models import half_precision_overflows, load_causal_lm, load_half_or_bfloat16

    def overflowing(model, device, dtype, **options):
        loaded = load_causal_lm(model, device, dtype, **options)
        with torch.no_grad():
            loaded.model.model.norm.weight.fill_(6e4)  # final hidden states of ~1e5: beyond float16's 65,504
        return loaded

    assert not half_precision_overflows(load_causal_lm("smollm2-135m", "cpu", torch.float16))
    assert half_precision_overflows(overflowing("smollm2-135m", "cpu", torch.float16))
    loaded = load_half_or_bfloat16(overflowing, "smollm2-135m", "cpu")
    assert loaded.model.dtype == torch.bfloat16 and not half_precision_overflows(loaded)
    assert "overflows float16" in caplog.text
    fine = load_half_or_bfloat16(load_causal_lm, "smollm2-135m", "cpu")
    assert fine.model.dtype == torch.float16


def test_missing_path_is_reported():
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model_path("./no/such/model")


def test_cached_hub_model_loads_with_the_network_off(engine, tmp_path):
    """A hub id already in the Hugging Face cache loads with HF_HUB_OFFLINE=1 and no
    socket at all (a fresh process, so the hub library reads the variable at import)."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--acme--smol-lm" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--smol-lm" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--smol-lm" / "refs" / "main").write_text("0" * 40)
    source = materialize_embedded("smollm2-135m")
    for f in source.iterdir():
        (snapshot / f.name).symlink_to(f)
    code = (
        "import socket\n"
        "def no_network(*a, **k): raise RuntimeError('network touched')\n"
        "socket.socket.connect = no_network\n"
        "socket.create_connection = no_network\n"
        "from lingua_integrations import CompressionEngine\n"
        "e = CompressionEngine('acme/smol-lm', device='cpu')\n"
        "print(e.compress(['The tower was completed in 1889 in Paris.'], rate=0.5).compressed_tokens)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0
