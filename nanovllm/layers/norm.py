"""Norms with the residual add fused in (one read of x and residual, two writes).

RMSNorm (Llama order), GemmaRMSNorm (scale 1 + w, fp32 until the end), LayerNorm with bias
(GPT-2). Each takes `(x, residual=None)`: with a residual it returns (norm(x + residual),
x + residual), the pre-norm decoder's two streams.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers import ops
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.kernel_options = DEFAULT_KERNEL_OPTIONS

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, self.kernel_options)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps, self.kernel_options)  # (normed, residual)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight); the checkpoint stores weight - 1 (zero init)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return ops.gemma_rms_norm(x, self.weight, self.eps, self.kernel_options)
        return ops.gemma_fused_add_rms_norm(x, residual, self.weight, self.eps, self.kernel_options)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2), statistics in fp32, output in x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is not None:
            x = residual = x + residual  # [T, hidden]
        out = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        return out if residual is None else (out, residual)
