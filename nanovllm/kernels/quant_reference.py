"""Pure-torch references of the quantized-weight GEMMs: the truth the Triton kernels
(`quant_gemv`, `quant_gemm`) are tested against, with the same prologue numerics as
`reference.skinny_gemm_reference` / `rms_norm_skinny_gemm_reference`."""

from __future__ import annotations

from typing import Optional

import torch

from nanovllm.kernels.quant_formats import QuantizedWeight, dequantize


def quant_linear_reference(
    x: torch.Tensor,  # [M, K]
    qw: QuantizedWeight,  # [N, K]
    bias: Optional[torch.Tensor] = None,  # [N]
) -> torch.Tensor:
    """fp32 x @ dequant(W)^T (+ bias), one rounding to x's dtype -> [M, N]."""
    out = x.float() @ dequantize(qw).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


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
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [M, 1]
    out = (hf * norm_weight.float()) @ dequantize(qw).t() * rstd
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype), h


def quant_silu_mul_linear_reference(
    x: torch.Tensor,  # [M, 2K]
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """silu(gate) * up rounded to x's dtype (as activation.silu_and_mul), then the GEMM."""
    gate, up = x.float().chunk(2, dim=-1)
    act = (gate / (1.0 + torch.exp(-gate))).to(x.dtype).float()
    h = (act * up).to(x.dtype)
    return quant_linear_reference(h, qw, bias)
