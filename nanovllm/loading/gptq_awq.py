"""Pre-quantized GPTQ and AWQ checkpoints: read `quantization_config`, unpack each linear's
packed tensors into natural-order codes (`QuantCodes`), which the engine then packs for its
own kernels (GPU) or torch's packed matmuls (CPU).

On disk (transformers / AutoGPTQ / AutoAWQ "gemm" conventions), per linear `<prefix>`:

  GPTQ  <prefix>.qweight  int32 [K / (32 / bits), N]  codes packed along K, code i at bits i*bits
        <prefix>.qzeros   int32 [groups, N / (32 / bits)]  zero points packed along N
        <prefix>.scales   fp16  [groups, N]
        <prefix>.g_idx    int32 [K]  group of each input feature (act-order: not k // G)
        W[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]
        checkpoint_format "gptq" (v1) stores z - 1; "gptq_v2" stores z.
  AWQ   <prefix>.qweight  int32 [K, N / 8]  codes packed along N in the order 0 2 4 6 1 3 5 7
        <prefix>.qzeros   int32 [groups, N / 8]  (same packing)
        <prefix>.scales   fp16  [groups, N]

GPTQ act-order (`desc_act`) with a g_idx that is not k // G is handled by sorting K by group
(`QuantizedLinearSource.input_perm`: the layer gathers x's columns in that order). Layers that
share an input (q/k/v, gate/up) share the permutation in GPTQ's algorithm; a checkpoint where
they differ is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch

from nanovllm.kernels.quant_formats import QuantCodes

SUPPORTED_METHODS = ("gptq", "awq")
GPTQ_BITS = (4, 8)
AWQ_BITS = (4,)
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds channel AWQ_PACK_ORDER[i]
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class PrequantConfig:
    """A checkpoint's `quantization_config`, validated."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1 in the file = one group per row
    desc_act: bool = False
    sym: bool = True
    zero_point_offset: int = 0  # added to stored zeros (GPTQ v1 stores z - 1)
    modules_to_not_convert: tuple = ()

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def parse_quantization_config(hf_config) -> Optional[PrequantConfig]:
    """The validated GPTQ / AWQ config of an HF model config, None when it is not quantized;
    ValueError for methods and variants this engine cannot run."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    method = str(_get(qc, "quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"checkpoint quantization {method!r} is not supported; supported pre-quantized "
                         f"formats: {', '.join(SUPPORTED_METHODS)} (or load a bf16/fp16 checkpoint and pass "
                         "quantization='int8' | 'int4' | 'fp8')")
    bits = int(_get(qc, "bits", _get(qc, "w_bit", 4)))
    group = int(_get(qc, "group_size", _get(qc, "q_group_size", 128)))
    skip = tuple(_get(qc, "modules_to_not_convert", None) or ())
    if method == "gptq":
        if bits not in GPTQ_BITS:
            raise ValueError(f"GPTQ with {bits} bits is not supported (supported: {GPTQ_BITS})")
        fmt = str(_get(qc, "checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        sym = bool(_get(qc, "sym", True))
        if bits == 8 and not sym:
            raise ValueError("8-bit GPTQ is supported only with sym=True (symmetric int8)")
        return PrequantConfig("gptq", bits, group, bool(_get(qc, "desc_act", False)), sym,
                              1 if fmt == "gptq" else 0, skip)
    version = str(_get(qc, "version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm' packing)")
    if bits not in AWQ_BITS:
        raise ValueError(f"AWQ with {bits} bits is not supported (supported: {AWQ_BITS})")
    if not bool(_get(qc, "zero_point", True)):
        raise ValueError("AWQ without zero points is not supported")
    return PrequantConfig("awq", bits, group, False, False, 0, skip)


# ----------------------------------------------------------------------------- unpacking


def _unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / f, C] -> [R, C] codes, code i of each word at bits i*bits (f = 32 / bits)."""
    f = 32 // bits
    shifts = (bits * torch.arange(f, dtype=torch.int64)).view(1, f, 1)
    w = packed.to(torch.int64).unsqueeze(1) & 0xFFFFFFFF  # [R/f, 1, C]
    return ((w >> shifts) & ((1 << bits) - 1)).reshape(-1, packed.shape[1])


def _unpack_along_cols(packed: torch.Tensor, bits: int, order: Optional[tuple] = None) -> torch.Tensor:
    """int32 [R, C / f] -> [R, C]; code i of a word is column order[i] of its f columns."""
    f = 32 // bits
    shifts = (bits * torch.arange(f, dtype=torch.int64)).view(1, 1, f)
    w = packed.to(torch.int64).unsqueeze(2) & 0xFFFFFFFF  # [R, C/f, 1]
    codes = (w >> shifts) & ((1 << bits) - 1)  # [R, C/f, i]
    if order is not None:
        inverse = [order.index(c) for c in range(f)]  # column c sits at nibble inverse[c]
        codes = codes[..., inverse]
    return codes.reshape(packed.shape[0], -1)


@dataclass
class QuantizedLinearSource:
    """One linear layer read from a pre-quantized checkpoint."""

    codes: QuantCodes  # natural order along K (or act-order sorted, see input_perm)
    input_perm: Optional[torch.Tensor] = None  # int64 [K]: the layer computes x[:, input_perm] @ W'^T


def _group_size(method: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, k: int, n: int,
                cfg: PrequantConfig, name: str) -> int:
    """The checkpoint's group size after checking that scales [groups, N] and qzeros [groups, N / pack]
    agree with qweight and that the groups cover K."""
    groups = scales.shape[0]
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // cfg.pack_factor):
        raise ValueError(f"{name}: {method} tensors disagree: qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)}, qzeros {tuple(qzeros.shape)}")
    group = k if cfg.group_size == -1 else cfg.group_size
    if groups * group != k:
        raise ValueError(f"{name}: {groups} groups of {group} do not cover K={k}")
    return group


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: Optional[torch.Tensor], cfg: PrequantConfig, name: str = "") -> QuantizedLinearSource:
    bits, f = cfg.bits, cfg.pack_factor
    k, n = qweight.shape[0] * f, qweight.shape[1]
    group = _group_size("GPTQ", qweight, qzeros, scales, k, n, cfg, name)
    groups = scales.shape[0]
    q = _unpack_along_rows(qweight, bits).t()  # [N, K]
    z = (_unpack_along_cols(qzeros, bits) + cfg.zero_point_offset).t().float()  # [N, groups]
    s = scales.float().t()  # [N, groups]
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"{name}: g_idx must be [K={k}] group ids < {groups}")
        natural = torch.arange(k) // group
        if not torch.equal(g_idx, natural):
            perm = torch.argsort(g_idx, stable=True)  # features of group 0 first, then 1, ...
            if not torch.equal(g_idx[perm], natural):
                raise ValueError(f"{name}: act-order g_idx does not give every group exactly {group} features")
            q = q[:, perm]
    return QuantizedLinearSource(_codes(q, s, z, group, bits), perm)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, cfg: PrequantConfig,
               name: str = "") -> QuantizedLinearSource:
    f = cfg.pack_factor
    k, n = qweight.shape[0], qweight.shape[1] * f
    group = _group_size("AWQ", qweight, qzeros, scales, k, n, cfg, name)
    q = _unpack_along_cols(qweight, cfg.bits, AWQ_PACK_ORDER).t()  # [N, K]
    z = _unpack_along_cols(qzeros, cfg.bits, AWQ_PACK_ORDER).t().float()
    return QuantizedLinearSource(_codes(q, scales.float().t(), z, group, cfg.bits))


def _codes(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int, bits: int) -> QuantCodes:
    """W = s (q - z): int4 -> (q, s, b = -s z); 8-bit symmetric (z = 128) -> int8 q - 128."""
    if bits == 4:
        return QuantCodes("int4", q.to(torch.uint8).contiguous(), s.contiguous(), (-s * z).contiguous(), group)
    if not torch.all(z == 128):
        raise ValueError("8-bit GPTQ with zero points other than 128 is not supported (use sym=True)")
    return QuantCodes("int8", (q - 128).to(torch.int8).contiguous(), s.contiguous(), None, group)


# ----------------------------------------------------------------------------- tensor stream


def group_quantized_tensors(tensors: Iterable[tuple[str, torch.Tensor, str]], cfg: PrequantConfig
                            ) -> Iterator[tuple[str, Union[torch.Tensor, QuantizedLinearSource], str]]:
    """Turn a checkpoint's (name, tensor, file) stream into one item per weight: plain tensors
    pass through; each quantized linear's qweight / qzeros / scales (/ g_idx) become
    ("<prefix>.weight", QuantizedLinearSource, file) once all its parts were seen (with
    desc_act, g_idx included; without, a g_idx seen later must be the natural k // G)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    needed = {"qweight", "qzeros", "scales"} | ({"g_idx"} if cfg.desc_act else set())
    for name, tensor, source in tensors:
        prefix, _, suffix = name.rpartition(".")
        if suffix not in QUANT_SUFFIXES:
            yield name, tensor, source
            continue
        # a lazy safetensors tensor is valid only until the stream moves on: read the part now
        tensor = tensor if isinstance(tensor, torch.Tensor) else tensor.load()
        if prefix in done:
            k = tensor.shape[0]
            group = k if cfg.group_size == -1 else cfg.group_size
            if suffix != "g_idx" or not torch.equal(tensor.to(torch.int64), torch.arange(k) // group):
                raise ValueError(f"{source}: {name} arrived after its layer was assembled; set desc_act in "
                                 "quantization_config if the checkpoint uses act-order")
            continue
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        if needed <= parts.keys():
            done.add(prefix)
            yield f"{prefix}.weight", _unpack(prefix, pending.pop(prefix), cfg), source
    for prefix, parts in pending.items():
        missing = sorted(needed - parts.keys())
        raise ValueError(f"quantized layer {prefix!r} lacks {', '.join(missing)} in the checkpoint")


def _unpack(prefix: str, parts: dict, cfg: PrequantConfig) -> QuantizedLinearSource:
    if cfg.method == "gptq":
        return unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), cfg, prefix)
    return unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], cfg, prefix)
