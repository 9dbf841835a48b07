"""Copy checkpoint tensors into a model's parameters, packed projections and shards included.

Under tensor parallelism a parameter holds one rank's part of a checkpoint tensor and says
which (`param.tp_shard`, a `layers.partition.ParamShard`): the loader checks the tensor's
full extent, then reads only that slice (safetensors: just those bytes; GGUF tensors are
dequantized whole, then sliced) and hands it to the parameter's `weight_loader`.

A model may translate its checkpoint's tensors first (`remap_checkpoint_tensor(name, tensor)`
yielding `(name, tensor)` or `(parameter name, tensor, shard)`): GPT-2's transposed Conv1D
weights, Phi-3's fused qkv split into q/k/v, MoE experts into slices of stacked weights. A
parameter that takes several shards names them in `expected_shards` (the stacked experts).

Errors name the file and the tensor: a wrong shape, an unexpected tensor, a missing one or
one holding NaN / Inf values is a ValueError, never a silent partial or corrupt load.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from nanovllm.layers.linear import WeightShapeError, default_weight_loader
from nanovllm.layers.partition import ParamShard
from nanovllm.layers.quantized_linear import as_codes, is_codes

# Tensors some checkpoints carry that the engine recomputes itself.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class FiniteCheck:
    """NaN / Inf scan of checkpoint tensors, cheap enough to run on every load.

    One `aminmax` reduction per tensor on the device it is loaded to (NaN propagates into
    both results, an Inf shows as one of them), no full-size temporaries, and one host sync
    for the whole model at the end. benchmarks/nan_scan_cost.py times it on the 8B shape.
    """

    def __init__(self) -> None:
        self._names: list[str] = []  # "<file>: tensor '<name>'"
        self._extrema: list[torch.Tensor] = []  # [2] per tensor, on its device

    def add(self, name: str, tensor: torch.Tensor, source: str = "checkpoint") -> None:
        if tensor.is_floating_point() and tensor.numel():
            low, high = torch.aminmax(tensor)
            self._names.append(f"{source}: tensor {name!r}")
            self._extrema.append(torch.stack((low, high)).float())

    def bad_tensors(self) -> list[str]:
        """Names of the tensors that hold a NaN or an Inf (one host sync per device)."""
        by_device: dict[torch.device, list[int]] = {}
        for i, e in enumerate(self._extrema):
            by_device.setdefault(e.device, []).append(i)
        bad: list[int] = []
        for indices in by_device.values():
            finite = torch.isfinite(torch.stack([self._extrema[i] for i in indices])).all(dim=1)  # [T]
            bad += [indices[j] for j in (~finite).nonzero().flatten().tolist()]
        return [self._names[i] for i in sorted(bad)]

    def raise_if_bad(self) -> None:
        bad = self.bad_tensors()
        if bad:
            more = f" ({len(bad) - 1} more tensors too)" if len(bad) > 1 else ""
            raise ValueError(f"{bad[0]} holds NaN or Inf values{more}; the checkpoint is corrupt (download or "
                             f"convert it again)")


def _load(param: nn.Parameter, value, shard, name: str, finite: "FiniteCheck", source: str) -> None:
    """Hand a checkpoint value to the parameter's loader: quantized codes (GGUF blocks, GPTQ /
    AWQ layers) as they are to a quantized layer's loader (their scales NaN-checked),
    dequantized for a plain parameter; tensors (torch or lazy) as this rank's part
    (read_shard) on the parameter's device, in its dtype."""
    loader = getattr(param, "weight_loader", default_weight_loader)
    if is_codes(value):
        codes = as_codes(value)
        finite.add(name, codes.scales, source)
        if codes.biases is not None:
            finite.add(name, codes.biases, source)
        if getattr(param, "accepts_codes", False):
            with torch.no_grad():
                loader(param, value, shard, name=name)
            return
        value = _dequantized(value, name)
    part = read_shard(value, getattr(param, "tp_shard", None), shard, name)
    with torch.no_grad():
        if part is None:  # this rank holds none of it (a row-parallel bias on ranks > 0)
            param.data.zero_()
        else:
            part = part.to(device=param.device, dtype=param.dtype)
            finite.add(name, part, source)
            loader(param, part, shard, name=name)


def _dequantized(value, name: str) -> torch.Tensor:
    """float32 weight of checkpoint codes, for a parameter (or a model's remap) that takes floats."""
    if getattr(value, "input_perm", None) is not None:
        raise WeightShapeError(f"tensor {name!r}: an act-order GPTQ layer needs a quantized layer")
    return as_codes(value).dequantize()


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, Any, str]]) -> None:
    """`tensors`: (name, value, source file); a value is a torch.Tensor, a lazy one with
    `shape`, `narrow(dim, start, length)` and `load()` (safetensors_loader.SafetensorsTensor),
    or quantized codes (`is_codes`: GGUF blocks, an assembled GPTQ / AWQ layer)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    finite = FiniteCheck()
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    remap = getattr(model, "remap_checkpoint_tensor", None)
    ignored = IGNORED_SUFFIXES + tuple(getattr(model, "ignored_checkpoint_suffixes", ()))
    loaded: set[str] = set()
    for checkpoint_name, checkpoint_tensor, source in tensors:
        if checkpoint_name.endswith(ignored):
            continue
        try:
            if remap:  # a remap computes on whole float tensors (transpose, split): read it whole first
                whole = (_dequantized(checkpoint_tensor, checkpoint_name) if is_codes(checkpoint_tensor)
                         else read_shard(checkpoint_tensor, None, None, checkpoint_name))
                entries = remap(checkpoint_name, whole)
            else:
                entries = [(checkpoint_name, checkpoint_tensor)]
            for entry in entries:
                _load_one(model, params, packed, tied, loaded, finite, source, *entry)
        except WeightShapeError as e:
            raise ValueError(f"{source}: {e}") from None
        except _Foreign as e:
            raise ValueError(f"{source}: tensor {e.args[0]!r} does not belong to {type(model).__name__}") from None
    _check_complete(model, params, packed, loaded, tied)
    finite.raise_if_bad()


class _Foreign(KeyError):
    """A checkpoint tensor with no parameter to go to."""


def _load_one(model, params, packed, tied, loaded, finite, source, name, tensor, shard=_Foreign) -> None:
    if tied and name == "lm_head.weight":
        return  # tied: the embedding is the head
    target = name
    if shard is _Foreign:  # not placed by the model's remap: the packed-projection names apply
        shard = None
        for fragment, (packed_fragment, packed_shard) in packed.items():
            if f".{fragment}." in name:
                target, shard = name.replace(f".{fragment}.", f".{packed_fragment}."), packed_shard
                break
    param = params.get(target)
    if param is None:
        raise _Foreign(name)
    _load(param, tensor, shard, name, finite, source)
    loaded.add(f"{target}:{shard}")
    for other, p in params.items():  # a quantized layer tied to this tensor (the head) takes its own copy
        if getattr(p, "tied_to", None) == target and other != target:
            _load(p, tensor, None, other, finite, source)


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
    for name, param in params.items():
        if tied and name == "lm_head.weight":
            continue
        if f"{name}:None" in loaded:  # loaded whole (a checkpoint that stores it packed)
            continue
        packed_fragment = next((p for p in shards_of if f".{p}." in name), None)
        shards = shards_of[packed_fragment] if packed_fragment else [None]
        shards = getattr(param, "expected_shards", shards)
        missing += [f"{name}:{s}" if s is not None else name for s in shards if f"{name}:{s}" not in loaded]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint is missing tensors for {type(model).__name__}: {missing[:5]}{more}")
