"""Build a ready-to-run model from a ModelSource: config, tokenizer, weights, dtype, device."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from nanovllm.loading.config_check import validate_hf_config
from nanovllm.loading.resolve import ModelSource
from nanovllm.loading.safetensors_loader import iter_safetensors
from nanovllm.loading.weights import load_weights
from nanovllm.models.registry import resolve_model_class, supported_architectures

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_hf_config(source: ModelSource, trust_remote_code: bool = False):
    if source.kind == "gguf":
        from nanovllm.loading.gguf_loader import read_gguf_checkpoint

        config = read_gguf_checkpoint(source.path).hf_config
        validate_hf_config(config, source.path)
        return config
    from transformers import AutoConfig

    path = os.path.join(source.path, "config.json")
    raw = _read_json(path)
    if raw is not None and set(raw.get("architectures") or ()) & set(supported_architectures()):
        validate_hf_config(raw, path)  # before transformers, which divides by some of these fields
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read model config ({e})") from e
    resolve_model_class(config)  # an unsupported architecture is the first thing to say
    validate_hf_config(config, path)
    return config


def _read_json(path: str) -> Optional[dict]:
    """The file's JSON object, or None when it is absent or not an object (AutoConfig then says why)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def load_tokenizer(source: ModelSource, tokenizer_path: Optional[str] = None, trust_remote_code: bool = False):
    if tokenizer_path is None and source.kind == "gguf":
        from nanovllm.loading.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    from transformers import AutoTokenizer

    path = tokenizer_path or source.path
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {path} ({e}); pass tokenizer=... or skip_tokenizer_init=True"
        ) from e


def eos_token_ids(source: ModelSource, hf_config, tokenizer) -> list[int]:
    """EOS ids from generation_config.json, the model config and the tokenizer (union)."""
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    gen_path = os.path.join(source.path, "generation_config.json") if source.kind == "hf_dir" else None
    if gen_path and os.path.isfile(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


# generation_config.json key -> SamplingParams field (what vLLM takes from it)
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(source: ModelSource, generation_config: str = "auto") -> dict:
    """Default sampling values from the model's generation_config.json ({} without one, or with "vllm").

    `generation_config` is "auto" (the model's directory), "vllm" (none) or a directory.
    """
    if generation_config == "vllm":
        return {}
    folder = source.path if generation_config == "auto" else generation_config
    if generation_config == "auto" and source.kind != "hf_dir":
        return {}
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if generation_config != "auto":
            raise ValueError(f"generation_config={generation_config!r}: {path} does not exist")
        return {}
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the generation config ({e})") from e
    return {field: values[key] for key, field in GENERATION_DEFAULT_KEYS.items() if values.get(key) is not None}


def resolve_dtype(requested: str, hf_config, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU; on GPU the checkpoint's half type, bf16 for fp32/GGUF checkpoints."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
        return dtype
    if device.type == "cpu":
        return torch.float32
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = DTYPES.get(cfg_dtype)
    return torch.float16 if cfg_dtype == torch.float16 else torch.bfloat16


def build_model(source: ModelSource, hf_config, device: torch.device, dtype: torch.dtype, max_positions: int,
                load_format: str = "auto"):
    """Instantiate the architecture and load its weights (`load_format='dummy'`: random weights)."""
    model_cls = resolve_model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(hf_config, max_positions)
    finally:
        torch.set_default_dtype(previous)
    model.model.cos_sin_cache = model.model.cos_sin_cache.float()
    if load_format == "dummy":
        init_random_weights(model)
    elif source.kind == "gguf":
        from nanovllm.loading.gguf_loader import read_gguf_checkpoint

        ckpt = read_gguf_checkpoint(source.path)
        load_weights(model, ((name, t, source.path) for name, t in ckpt.iter_tensors()))
    else:
        load_weights(model, iter_safetensors(source.path))
    return model.eval()


def checkpoint_is_16bit_or_less(source: ModelSource, hf_config) -> bool:
    """GGUF files (quantized or f16 in practice) and bf16/fp16 HF checkpoints."""
    if source.kind == "gguf":
        return True
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return str(cfg_dtype).replace("torch.", "") in ("bfloat16", "float16")


def maybe_pack_cpu_weights(model, fmt: str, source: ModelSource, hf_config) -> bool:
    """Pack every Linear's weight to fp16 for fbgemm on CPU (see Linear.pack_fp16_for_cpu)."""
    from nanovllm.layers.linear import Linear, cpu_fp16_gemm_available

    want = fmt == "fp16" or (fmt == "auto" and checkpoint_is_16bit_or_less(source, hf_config))
    if not want or next(model.parameters()).dtype != torch.float32:
        return False
    if not cpu_fp16_gemm_available():
        if fmt == "fp16":
            raise ValueError("cpu_weight_format='fp16' needs torch's fbgemm backend (x86); use 'fp32'")
        return False
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack_fp16_for_cpu()
    return True


# Random-weight benchmarks: small init keeps activations finite through many layers.
DUMMY_INIT_STD = 0.02


@torch.no_grad()
def init_random_weights(model, seed: int = 0) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, DUMMY_INIT_STD, generator=gen)
