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

from nanovllm.loading.resolve import ModelSource

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
    if source.kind == "gguf":
        from nanovllm.loading.gguf_loader import read_gguf_checkpoint

        return read_gguf_checkpoint(source.path).hf_config
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{os.path.join(source.path, 'config.json')}: cannot read model config ({e})") from e


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


def resolve_max_model_len(hf_config, requested: Optional[int]) -> int:
    """The user's max_model_len, or the model's max_position_embeddings capped."""
    model_max = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN_CAP
    if requested is None:
        return min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)
    if requested > model_max:
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d", requested, model_max)
    return requested
