"""Attention layer: [q/k RMSNorm +] RoPE + KV-cache store, then paged attention over the cache.

Per-layer settings: `sliding_window` (Mistral; Gemma's local layers), `softcap` (Gemma 2's
attention-logit soft-capping). A model without RoPE (GPT-2: learned positions) passes
`cos_sin_cache=None`: K and V are stored as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import reference
from nanovllm.layers import ops
from nanovllm.layers.attention import torch_backend, triton_backend
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS
from nanovllm.layers.norm import RMSNorm


MIN_CACHE_HEAD_DIM = 16  # the attention kernels' smallest head tile


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        # The Triton attention kernels tile head_dim as a power of two >= 16. Another head_dim
        # (Phi-3's 96) is cached zero-padded to the next one: zeros change no q.k and give zero
        # output features, cut off after attention. The worker allocates this size.
        self.cache_head_dim = max(MIN_CACHE_HEAD_DIM, 1 << (head_dim - 1).bit_length())
        self.kernel_options = DEFAULT_KERNEL_OPTIONS
        # Bound by the worker once the cache is allocated: [num_blocks, Hkv, block_size, cache_head_dim].
        self.k_cache: torch.Tensor = torch.empty(0)
        self.v_cache: torch.Tensor = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        positions: torch.Tensor,  # [T]
        cos_sin_cache: Optional[torch.Tensor],  # None: no RoPE (learned positions)
        ctx: ForwardContext,
        q_norm: Optional[RMSNorm] = None,  # Qwen3: per-head RMSNorm of q / k, applied before RoPE
        k_norm: Optional[RMSNorm] = None,
    ) -> torch.Tensor:
        options = self.kernel_options
        triton_rope = ops.use_triton(q, options)
        pad = self.cache_head_dim - self.head_dim
        store_with_rope = pad == 0 and cos_sin_cache is not None
        norms = [n for n in (q_norm, k_norm) if n is not None]
        if store_with_rope and norms and triton_rope and self._qk_norm_fusable(q, norms):
            # One Triton launch normalises, rotates and stores: two RMSNorm launches per layer
            # fewer than the unfused path below, same numerics (reference.rope_and_store_kv).
            q, k = triton_backend.rope_and_store_kv(
                q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping, options,
                q_norm_weight=None if q_norm is None else q_norm.weight,
                k_norm_weight=None if k_norm is None else k_norm.weight, norm_eps=norms[0].eps,
            )
            return self._attend(q, ctx)  # [T, H, D]
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        if store_with_rope:
            q, k = self._rope_and_store(q, k, v, positions, cos_sin_cache, ctx, triton_rope)
            return self._attend(q, ctx)  # [T, H, D]
        if cos_sin_cache is not None:  # rotate only; stored below once padded
            q, k = self._rope(q, k, v, positions, cos_sin_cache, triton_rope)
        if pad:
            q, k, v = (F.pad(x, (0, pad)) for x in (q, k, v))  # [T, *, cache_head_dim]
        self._store(k, v, ctx, triton_rope)
        out = self._attend(q, ctx)  # [T, H, cache_head_dim]
        return out[..., : self.head_dim] if pad else out

    def _store(self, k, v, ctx: ForwardContext, triton: bool) -> None:
        if triton:
            triton_backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, self.kernel_options)
        else:
            reference.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)

    def _rope(self, q, k, v, positions, cos_sin_cache, triton: bool):
        if triton:
            return triton_backend.rope_and_store_kv(q, k, v, positions, cos_sin_cache, None, None, None,
                                                    self.kernel_options)
        return reference.rope_and_store_kv(q, k, v, positions, cos_sin_cache, None, None, None)

    def _rope_and_store(self, q, k, v, positions, cos_sin_cache, ctx: ForwardContext, triton_rope: bool):
        args = (q, k, v, positions, cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping)
        if triton_rope:
            return triton_backend.rope_and_store_kv(*args, self.kernel_options)
        if not q.is_cuda:
            return torch_backend.rope_and_store_kv(*args, ctx.scratch)
        return reference.rope_and_store_kv(*args)

    def _attend(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        options = self.kernel_options
        # The cascade kernels have no window and no soft-cap: such layers ignore the plan (still exact).
        if ctx.cascade is not None and self.sliding_window is None and self.softcap is None:
            out = self._attend_cascade(q, ctx)
            if out is not None:
                return out
        if options.triton_attention and ops.use_triton(q, options):
            return triton_backend.paged_attention(q, self.k_cache, self.v_cache, ctx, self.scale,
                                                  self.sliding_window, options, softcap=self.softcap)
        if not q.is_cuda and ctx.query_start_loc_cpu is not None:
            return torch_backend.paged_attention(
                q, self.k_cache, self.v_cache, ctx.query_start_loc_cpu, ctx.seq_lens_cpu, ctx.block_tables,
                self.scale, sliding_window=self.sliding_window, scratch=ctx.scratch, softcap=self.softcap,
            )
        return reference.paged_attention(
            q, self.k_cache, self.v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, self.scale,
            sliding_window=self.sliding_window, softcap=self.softcap,
        )

    def _attend_cascade(self, q: torch.Tensor, ctx: ForwardContext) -> Optional[torch.Tensor]:
        """Shared prefixes read once (layers/attention/cascade.py); None when no backend here serves the plan."""
        options = self.kernel_options
        if options.triton_attention and ops.use_triton(q, options):
            return triton_backend.cascade_attention(q, self.k_cache, self.v_cache, ctx, self.scale, options)
        if not q.is_cuda and ctx.is_decode_only and ctx.cascade.prefixes is not None:
            return torch_backend.cascade_decode(q, self.k_cache, self.v_cache, ctx.cascade, ctx.block_tables,
                                                self.scale, scratch=ctx.scratch)
        return None

    @staticmethod
    def _qk_norm_fusable(q: torch.Tensor, norms: list[RMSNorm]) -> bool:
        """One eps per launch; a norm weight wider than q would widen the unfused output; the
        kernel computes the Llama-style norm only (not Gemma's `1 + w`)."""
        return all(type(n) is RMSNorm and n.eps == norms[0].eps and n.weight.dtype == q.dtype for n in norms)
