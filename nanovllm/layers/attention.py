"""Attention layer: [q/k RMSNorm +] RoPE + KV-cache store, then paged attention over the cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanovllm.layers import ops
from nanovllm.layers.norm import RMSNorm
from nanovllm.worker.forward_context import ForwardContext


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Bound by the ModelRunner once the cache is allocated: [num_blocks, Hkv, block_size, D].
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        positions: torch.Tensor,  # [T]
        cos_sin_cache: torch.Tensor,
        ctx: ForwardContext,
        q_norm: Optional[RMSNorm] = None,  # Qwen3: per-head RMSNorm of q / k, applied before RoPE
        k_norm: Optional[RMSNorm] = None,
    ) -> torch.Tensor:
        if (q_norm is not None or k_norm is not None) and self._fuse_qk_norm(q, q_norm, k_norm):
            # One Triton launch normalises, rotates and stores: two RMSNorm launches per layer
            # fewer than the unfused path below, same numerics (reference.rope_and_store_kv).
            from nanovllm.kernels import rope_kv_store

            q, k = rope_kv_store.rope_and_store_kv(
                q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping,
                q_norm_weight=None if q_norm is None else q_norm.weight,
                k_norm_weight=None if k_norm is None else k_norm.weight,
                norm_eps=(q_norm if q_norm is not None else k_norm).eps,
            )
        else:
            if q_norm is not None:
                q = q_norm(q)
            if k_norm is not None:
                k = k_norm(k)
            q, k = ops.rope_and_store_kv(q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache,
                                         ctx.slot_mapping, ctx)
        return ops.paged_attention(
            q, self.k_cache, self.v_cache, ctx, self.scale, self.sliding_window, use_triton=ctx.use_triton
        )  # [T, H, D]

    @staticmethod
    def _fuse_qk_norm(q: torch.Tensor, q_norm: Optional[RMSNorm], k_norm: Optional[RMSNorm]) -> bool:
        """Fused norm + RoPE where the RoPE itself would run in Triton (ops' own choice)."""
        norms = [n for n in (q_norm, k_norm) if n is not None]
        if any(n.eps != norms[0].eps or n.weight.dtype != q.dtype for n in norms):
            return False  # one eps per launch; a wider weight would widen the unfused output
        return ops._use_triton(q)
