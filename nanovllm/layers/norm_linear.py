"""A projection and the elementwise op in front of it, as one module that decides how to run them.

    RMSNormLinear:  (residual add +) RMSNorm, then qkv_proj / gate_up_proj
    SiluMulLinear:  silu(gate) * up, then down_proj

Why. At decode batch sizes every launch costs about as much as a small kernel's work; when
the projection runs as the Triton skinny GEMM (`Linear.uses_gemv`), the op in front is
folded into it as a prologue (`kernels/gemv.py`): two launches fewer per decoder layer.
Otherwise (cuBLAS, CPU, prefill, `KernelOptions.fuse_gemv_prologues=False`) the two ops run
separately. Either way the model's code reads like the math; the choice is made here.

RMSNormLinear runs a norm and a linear that belong to the model where the checkpoint names
them (`input_layernorm`, `self_attn.qkv_proj`): it refers to them without registering them
as its own children, so parameter names and weight loading are unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from nanovllm.layers import ops
from nanovllm.layers.linear import Linear, RowParallelLinear, gemv_kernels
from nanovllm.layers.norm import RMSNorm

logger = logging.getLogger(__name__)


class RMSNormLinear(nn.Module):
    """`linear(norm(x [+ residual]))`, returning (projection [T, N], new residual [T, K]);
    with residual None the new residual is x (the first decoder layer)."""

    def __init__(self, norm: RMSNorm, linear: Linear) -> None:
        super().__init__()
        self._parts = (norm, linear)  # a tuple: not registered, the model owns both

    @property
    def norm(self) -> RMSNorm:
        return self._parts[0]

    @property
    def linear(self) -> Linear:
        return self._parts[1]

    def rewire(self, linear: Linear) -> None:
        """Run `linear` (a replacement the model now owns, e.g. its quantized version)."""
        self._parts = (self._parts[0], linear)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        norm, linear = self._parts
        if getattr(linear, "quantized", False):  # a quantized linear folds the norm into its own kernel
            fused = linear.fused_rms_norm(x, residual, norm)
            if fused is not None:
                return fused
        elif linear.gemv_rows and self._fusable(x, residual) and linear.uses_gemv(x):
            gemv = gemv_kernels()
            try:
                return gemv.rms_norm_skinny_gemm(x, residual, norm.weight, norm.eps, linear.weight, linear.bias,
                                                 pdl=linear.kernel_options.pdl)
            except gemv.NotTunedError as e:
                logger.warning("%s; this graph runs the norm and the projection separately", e)
        if residual is None:
            return linear(norm(x)), x
        hidden, residual = norm(x, residual)
        return linear(hidden), residual

    def _fusable(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
        w = self.norm.weight
        return (self.linear.kernel_options.fuse_gemv_prologues and x.dim() == 2 and x.stride(-1) == 1
                and w.dtype == x.dtype and w.dim() == 1 and w.stride(0) == 1
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                          and residual.stride(-1) == 1)))


class SiluMulLinear(RowParallelLinear):
    """A Linear of K inputs applied to `silu(x[..., :K]) * x[..., K:]` (the MLP's down
    projection after gate_up): one kernel when the skinny GEMM serves the call. Row-parallel:
    with tensor parallelism each rank holds its share of K (its gate and up rows) and the
    ranks' outputs are summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, 2K] = [gate | up], this rank's K
        out = None
        if (self.gemv_rows and self.kernel_options.fuse_gemv_prologues and x.dim() == 2
                and self.uses_gemv(x, x_features=2 * self.in_features)):
            gemv = gemv_kernels()
            try:
                out = gemv.silu_mul_skinny_gemm(x, self.weight, self.bias, pdl=self.kernel_options.pdl)
            except gemv.NotTunedError as e:
                logger.warning("%s; this graph runs the activation and the projection separately", e)
        if out is None:
            out = Linear.forward(self, ops.silu_and_mul(x, self.kernel_options))
        return self.tp.all_reduce(out) if self.reduce else out
