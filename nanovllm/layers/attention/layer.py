"""Attention layer: [q/k RMSNorm +] RoPE + KV-cache store, then paged attention over the cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanovllm.kernels import reference
from nanovllm.layers import ops
from nanovllm.layers.attention import torch_backend, triton_backend
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS
from nanovllm.layers.norm import RMSNorm


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kernel_options = DEFAULT_KERNEL_OPTIONS
        # Bound by the worker once the cache is allocated: [num_blocks, Hkv, block_size, D].
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
        options = self.kernel_options
        triton_rope = ops.use_triton(q, options)
        norms = [n for n in (q_norm, k_norm) if n is not None]
        if norms and triton_rope and self._qk_norm_fusable(q, norms):
            # One Triton launch normalises, rotates and stores: two RMSNorm launches per layer
            # fewer than the unfused path below, same numerics (reference.rope_and_store_kv).
            q, k = triton_backend.rope_and_store_kv(
                q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping, options,
                q_norm_weight=None if q_norm is None else q_norm.weight,
                k_norm_weight=None if k_norm is None else k_norm.weight, norm_eps=norms[0].eps,
            )
        else:
            if q_norm is not None:
                q = q_norm(q)
            if k_norm is not None:
                k = k_norm(k)
            q, k = self._rope_and_store(q, k, v, positions, cos_sin_cache, ctx, triton_rope)
        return self._attend(q, ctx)  # [T, H, D]

    def _rope_and_store(self, q, k, v, positions, cos_sin_cache, ctx: ForwardContext, triton_rope: bool):
        args = (q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping)
        if triton_rope:
            return triton_backend.rope_and_store_kv(*args, self.kernel_options)
        if not q.is_cuda:
            return torch_backend.rope_and_store_kv(*args, ctx.scratch)
        return reference.rope_and_store_kv(*args)

    def _attend(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        options = self.kernel_options
        if options.triton_attention and ops.use_triton(q, options):
            return triton_backend.paged_attention(q, self.k_cache, self.v_cache, ctx, self.scale,
                                                  self.sliding_window, options)
        if not q.is_cuda and ctx.query_start_loc_cpu is not None:
            return torch_backend.paged_attention(
                q, self.k_cache, self.v_cache, ctx.query_start_loc_cpu, ctx.seq_lens_cpu, ctx.block_tables,
                self.scale, sliding_window=self.sliding_window, scratch=ctx.scratch,
            )
        return reference.paged_attention(
            q, self.k_cache, self.v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, self.scale,
            sliding_window=self.sliding_window,
        )

    @staticmethod
    def _qk_norm_fusable(q: torch.Tensor, norms: list[RMSNorm]) -> bool:
        """One eps per launch; a norm weight wider than q would widen the unfused output."""
        return all(n.eps == norms[0].eps and n.weight.dtype == q.dtype for n in norms)
