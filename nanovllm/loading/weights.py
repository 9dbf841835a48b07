"""Copy checkpoint tensors into a model's parameters, packed projections and shards included.

Under tensor parallelism a parameter holds one rank's part of a checkpoint tensor and says
which (`param.tp_shard`, a `layers.partition.ParamShard`): the loader checks the tensor's
full extent, then reads only that slice (safetensors: just those bytes; GGUF tensors are
dequantized whole, then sliced) and hands it to the parameter's `weight_loader`.

Errors name the file and the tensor: a wrong shape, an unexpected tensor or a missing one
is a ValueError, never a silent partial load.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from nanovllm.layers.linear import WeightShapeError, default_weight_loader
from nanovllm.layers.partition import ParamShard

# Tensors some checkpoints carry that the engine recomputes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, Any, str]]) -> None:
    """`tensors`: (name, tensor, source file); a tensor is a torch.Tensor or a lazy one with
    `shape`, `narrow(dim, start, length)` and `load()` (safetensors_loader.SafetensorsTensor)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[str] = set()
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
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            part = read_shard(tensor, getattr(param, "tp_shard", None), shard, name)
            with torch.no_grad():
                if part is None:  # this rank holds none of it (a row-parallel bias on ranks > 0)
                    param.data.zero_()
                else:
                    loader(param, part.to(param.dtype), shard, name=name)
        except WeightShapeError as e:
            raise ValueError(f"{source}: {e}") from None
        loaded.add(f"{target}:{shard}")
    _check_complete(model, params, packed, loaded, tied)


def read_shard(tensor: Any, spec: Optional[ParamShard], shard, name: str) -> Optional[torch.Tensor]:
    """The part of a checkpoint tensor a parameter holds (all of it without `spec`); None
    when it holds none. Raises WeightShapeError when the tensor's split dim has the wrong extent."""
    if spec is None:
        load = None if isinstance(tensor, torch.Tensor) else getattr(tensor, "load", None)
        return load() if load is not None else tensor
    if shard not in spec.ranges:
        raise WeightShapeError(f"tensor {name!r}: unknown shard {shard!r} of a packed projection")
    shape, full = tuple(tensor.shape), spec.full_sizes[shard]
    if len(shape) <= spec.dim or shape[spec.dim] != full:
        raise WeightShapeError(f"tensor {name!r}: expected {full} along dim {spec.dim}, checkpoint has shape {shape}")
    if spec.skip:
        return None
    r = spec.ranges[shard]
    return tensor.narrow(spec.dim, r.start, r.size)


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
