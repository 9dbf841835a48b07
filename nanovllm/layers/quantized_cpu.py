"""CPU GEMMs straight from 4- and 8-bit weights, through torch's packed weight-only matmuls.

Why. On CPU a decode step streams every weight once per token, like on a GPU; the bundled
SmolLM2 GGUF is 4-bit (Q4_1), yet fp16-packed copies read 4x its bytes. torch ships
weight-only kernels for x86 (`aten._weight_int4pack_mm_for_cpu`: int4 codes, one bf16 scale
and offset per group, w = (q - 8) s + z; `aten._weight_int8pack_mm`: int8, one scale per
output channel). Both want bf16 activations (their fp32 / fp16 paths are 10-100x slower on
this machine), so x is rounded to bf16 for the GEMM and the result widened back to fp32:
the rest of the CPU forward stays fp32.

Measured on the 2-core CI machine type (single thread, noisy host): SmolLM2's 3072x576
gate_up at batch 1: int4 128 us, int8 118 us, fbgemm fp16 158 us; the 49152x576 LM head:
int4 2.0 ms, int8 8.7 ms, fp16 17 ms. At batch 8 the int4 kernel is no faster than fp16
(it dequantizes per row), so batch-8 throughput is about unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch

from nanovllm.kernels.quant_formats import QuantCodes

INT4_CPU_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU kernel accepts
INT4_CPU_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0
INT8_CPU_K_MULTIPLE = 16  # _weight_int8pack_mm segfaults (torch 2.13) for other K (e.g. 24, 72, 1544)
INT4_CPU_INNER_K_TILES = 2  # packing argument of _convert_weight_to_int4pack_for_cpu (any of 1/2/4/8 on CPU)
INT4_CODE_CENTER = 8  # torch's int4 kernels compute (q - 8) * scale + zero


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # the overload itself: no per-call dispatch lookup
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


@dataclass
class CpuInt4Weight:
    packed: torch.Tensor  # uint8 [N, K / 2], torch's CPU int4 layout
    scales_zeros: torch.Tensor  # bf16 [K / G, N, 2]
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2

    def mm(self, xb: torch.Tensor) -> torch.Tensor:
        """bf16 [M, K] -> bf16 [M, N]."""
        return _INT4_MM(xb, self.packed, self.group_size, self.scales_zeros)


@dataclass
class CpuInt8Weight:
    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # bf16 [N]
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2

    def mm(self, xb: torch.Tensor) -> torch.Tensor:
        """bf16 [M, K] -> bf16 [M, N]."""
        return _INT8_MM(xb, self.codes, self.scales)


CpuQuantWeight = Union[CpuInt4Weight, CpuInt8Weight]


@functools.lru_cache(maxsize=None)
def cpu_quant_ops_available() -> bool:
    """Whether this torch build has the CPU int4 / int8 weight-only kernels."""
    try:
        q = torch.zeros(INT4_CPU_N_MULTIPLE, 64, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_CPU_INNER_K_TILES)
        sz = torch.zeros(2, INT4_CPU_N_MULTIPLE, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, 64, dtype=torch.bfloat16), packed, 32, sz)
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.int8),
                                           torch.ones(8, dtype=torch.bfloat16))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack_int4_cpu(codes: QuantCodes) -> CpuInt4Weight:
    """int4 codes (W = s q + b per group) -> torch's CPU int4 format (W = (q - 8) s + z)."""
    n, k = codes.codes.shape
    if codes.qtype != "int4":
        raise ValueError(f"pack_int4_cpu needs int4 codes, got {codes.qtype}")
    if codes.group_size not in INT4_CPU_GROUPS or k % codes.group_size:
        raise ValueError(f"CPU int4 needs a group size in {INT4_CPU_GROUPS} dividing K={k}, got {codes.group_size}")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.codes.to(torch.int32).contiguous(),
                                                                INT4_CPU_INNER_K_TILES)
    s, b = codes.scales.float(), codes.biases.float()  # [N, K / G]
    zeros = b + INT4_CODE_CENTER * s
    scales_zeros = torch.stack([s, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
    return CpuInt4Weight(packed, scales_zeros, codes.group_size, k, n)


def pack_int8_cpu(weight: Union[torch.Tensor, QuantCodes]) -> CpuInt8Weight:
    """Per-output-channel symmetric int8 for torch's CPU kernel: int8 codes with one scale per
    row are kept; grouped codes (GGUF Q8_0 / Q6_K) and float weights are (re)quantized per row.
    K must be a multiple of INT8_CPU_K_MULTIPLE."""
    if (isinstance(weight, QuantCodes) and weight.qtype == "int8" and weight.scales.shape[1] == 1
            and not weight.padded and weight.k % INT8_CPU_K_MULTIPLE == 0):
        return CpuInt8Weight(weight.codes.contiguous(), weight.scales.reshape(-1).to(torch.bfloat16),
                             weight.codes.shape[1], weight.codes.shape[0])
    w = weight.dequantize() if isinstance(weight, QuantCodes) else weight.float()
    if w.shape[1] % INT8_CPU_K_MULTIPLE:
        raise ValueError(f"CPU int8 needs K a multiple of {INT8_CPU_K_MULTIPLE}, got {w.shape[1]}")
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # [N]
    scale = scale.to(torch.bfloat16).float()  # the kernel's own precision, before rounding the codes
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return CpuInt8Weight(codes.contiguous(), scale.to(torch.bfloat16), w.shape[1], w.shape[0])


def cpu_quant_linear(x: torch.Tensor, weight: CpuQuantWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] (any float dtype) @ W^T (+ bias) -> [..., N] in x's dtype; the GEMM runs on
    bf16 activations with fp32 accumulation. Few Python steps: at batch 1 this wrapper runs
    ~120 times a step next to ~100 us GEMMs."""
    if x.dim() == 2:
        if x.shape[0] == 0:
            return x.new_empty(0, weight.out_features)
        out = weight.mm(x.to(torch.bfloat16)).to(x.dtype)  # [M, N]
    else:
        out = cpu_quant_linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.out_features)
    return out if bias is None else out + bias
