"""Copy checkpoint tensors into a model's parameters, packed projections included.

Errors name the file and the tensor: a wrong shape, an unexpected tensor or a missing one
is a ValueError, never a silent partial load.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from nanovllm.layers.linear import WeightShapeError, default_weight_loader
from nanovllm.layers.quantized_linear import as_codes

# Tensors some checkpoints carry that the engine recomputes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
EMBEDDING_NAME = "model.embed_tokens.weight"


def _load(param: nn.Parameter, value, shard, name: str) -> None:
    """Hand a checkpoint value to the parameter's loader: float tensors in the parameter's
    dtype; quantized codes (GGUF blocks, GPTQ / AWQ layers) as they are to a quantized layer's
    loader, dequantized for a plain parameter."""
    loader = getattr(param, "weight_loader", default_weight_loader)
    if not isinstance(value, torch.Tensor):
        if not getattr(param, "accepts_codes", False):
            if getattr(value, "input_perm", None) is not None:
                raise WeightShapeError(f"tensor {name!r}: an act-order GPTQ layer needs a quantized layer")
            value = as_codes(value).dequantize()
    if isinstance(value, torch.Tensor):
        value = value.to(param.dtype)
    with torch.no_grad():
        loader(param, value, shard, name=name)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor, str]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[str] = set()
    head = params.get("lm_head.weight")
    head_from_embedding = head if tied and getattr(head, "accepts_codes", False) else None
    for name, tensor, source in tensors:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if tied and name == "lm_head.weight":
            continue  # tied: the embedding is the head
        target, shard = name, None
        for fragment, (packed_fragment, packed_shard) in packed.items():
            if f".{fragment}." in name:
                target, shard = name.replace(f".{fragment}.", f".{packed_fragment}."), packed_shard
                break
        param = params.get(target)
        if param is None:
            raise ValueError(f"{source}: tensor {name!r} does not belong to {type(model).__name__}")
        try:
            _load(param, tensor, shard, name)
            if head_from_embedding is not None and name == EMBEDDING_NAME:
                _load(head_from_embedding, tensor, None, "lm_head.weight")  # tied, but the head is quantized
        except WeightShapeError as e:
            raise ValueError(f"{source}: {e}") from None
        loaded.add(f"{target}:{shard}")
    _check_complete(model, params, packed, loaded, tied)


def _check_complete(model, params, packed, loaded, tied) -> None:
    shards_of: dict[str, list] = {}
    for fragment, (packed_fragment, shard) in packed.items():
        shards_of.setdefault(packed_fragment, []).append(shard)
    missing = []
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        packed_fragment = next((p for p in shards_of if f".{p}." in name), None)
        shards = shards_of[packed_fragment] if packed_fragment else [None]
        missing += [f"{name}:{s}" if s is not None else name for s in shards if f"{name}:{s}" not in loaded]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint is missing tensors for {type(model).__name__}: {missing[:5]}{more}")
