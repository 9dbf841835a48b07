"""What the engine and its workers need to know about a model before building it (plain data).

The engine reads the HF config (vocabulary, context length), the tokenizer and the EOS ids
itself; the worker gets the same `ModelInfo` (picklable) and builds the model from it. No
torch model code is imported here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

from nanovllm.loading.config_check import validate_hf_config
from nanovllm.loading.resolve import ModelSource
from nanovllm.models.architectures import SUPPORTED_ARCHITECTURES, check_supported

logger = logging.getLogger("nanovllm")

# Without an explicit max_model_len, long-context models are capped to keep the
# rope table and the per-request KV check reasonable; users can raise it.
DEFAULT_MAX_MODEL_LEN_CAP = 32768


@dataclass(frozen=True)
class ModelInfo:
    source: ModelSource
    hf_config: object  # transformers PretrainedConfig (or the GGUF reader's equivalent)
    max_model_len: int
    eos_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


def load_hf_config(source: ModelSource, trust_remote_code: bool = False):
    """The model's config, its key fields checked (config_check.py): a config.json with
    `num_attention_heads: 0` is a ValueError naming the file and field, not a crash later."""
    if source.kind == "gguf":
        from nanovllm.loading.gguf_loader import read_gguf_checkpoint

        config = read_gguf_checkpoint(source.path).hf_config
        validate_hf_config(config, source.path)
        return config
    from transformers import AutoConfig

    path = os.path.join(source.path, "config.json")
    raw = _read_json(path)
    if raw is not None and set(raw.get("architectures") or ()) & set(SUPPORTED_ARCHITECTURES):
        validate_hf_config(raw, path)  # before transformers, which divides by some of these fields
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read model config ({e})") from e
    check_supported(config)  # an unsupported architecture is the first thing to say
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


def resolve_max_model_len(hf_config, requested: Optional[int], allow_long: bool = False) -> int:
    """The user's max_model_len, or the model's max_position_embeddings capped.

    A longer request than the model was trained for is refused unless `allow_long`
    (positions past max_position_embeddings give garbage on most models)."""
    model_max = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN_CAP
    if requested is None:
        return min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)
    if requested > model_max:
        if not allow_long:
            raise ValueError(
                f"max_model_len={requested} is longer than the model's max_position_embeddings={model_max}: "
                f"lower it, or pass allow_long_max_model_len=True (CLI: --allow-long-max-model-len) to use "
                f"positions the model was not trained on")
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d "
                       "(allow_long_max_model_len=True)", requested, model_max)
    return requested


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
