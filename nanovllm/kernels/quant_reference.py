"""Pure-torch references of the quantized-weight GEMMs: the truth the Triton kernels
(`quant_gemv`, `quant_gemm`) are tested against. Each is the bf16 skinny GEMM's reference
(`reference.py`) on the dequantized fp32 weight: the same prologue numerics, one rounding."""

from __future__ import annotations

from typing import Optional

import torch

from nanovllm.kernels.quant_formats import QuantizedWeight, dequantize
from nanovllm.kernels.reference import (rms_norm_skinny_gemm_reference, silu_mul_skinny_gemm_reference,
                                        skinny_gemm_reference)


def quant_linear_reference(
    x: torch.Tensor,  # [M, K]
    qw: QuantizedWeight,  # [N, K]
    bias: Optional[torch.Tensor] = None,  # [N]
) -> torch.Tensor:
    """fp32 x @ dequant(W)^T (+ bias), one rounding to x's dtype -> [M, N]."""
    return skinny_gemm_reference(x, dequantize(qw), bias)


def quant_rms_norm_linear_reference(
    x: torch.Tensor,  # [M, K]
    residual: Optional[torch.Tensor],  # [M, K] or None
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused norm prologue: new residual rounded to x's dtype; then in fp32
    (h * g) @ dequant(W)^T / rms(h) (+ bias), rounded once."""
    return rms_norm_skinny_gemm_reference(x, residual, norm_weight, eps, dequantize(qw), bias)


def quant_silu_mul_linear_reference(
    x: torch.Tensor,  # [M, 2K]
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """silu(gate) * up rounded to x's dtype (as activation.silu_and_mul), then the GEMM."""
    return silu_mul_skinny_gemm_reference(x, dequantize(qw), bias)
