"""Attention layer: RoPE + KV-cache store, then paged attention over the cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanovllm.layers import ops
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
    ) -> torch.Tensor:
        q, k = ops.rope_and_store_kv(q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping,
                                     ctx)
        return ops.paged_attention(
            q, self.k_cache, self.v_cache, ctx, self.scale, self.sliding_window, use_triton=ctx.use_triton
        )  # [T, H, D]
