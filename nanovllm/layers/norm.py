"""RMSNorm with the residual add fused in (one read of x and residual, two writes)."""

from __future__ import annotations

from typing import Optional

import torch
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
