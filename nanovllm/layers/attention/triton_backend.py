"""The Triton attention backend for CUDA tensors: RoPE + KV store and paged attention.

Thin wrappers that hand the layer's `KernelOptions.pdl` to the kernels; the kernel modules
are imported on first use (they import triton) and looked up at call time.
"""

from __future__ import annotations

from typing import Optional

import torch

from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.kernel_options import KernelOptions


def rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                      options: KernelOptions, q_norm_weight: Optional[torch.Tensor] = None,
                      k_norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 1e-6):
    """[per-head RMSNorm of q / k,] RoPE of q and k in place, K/V into the cache; returns (q, k)."""
    from nanovllm.kernels import rope_kv_store

    if q_norm_weight is None and k_norm_weight is None:
        return rope_kv_store.rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache,
                                               slot_mapping, pdl=options.pdl)
    return rope_kv_store.rope_and_store_kv(
        query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps, pdl=options.pdl,
    )


def store_kv(key, value, k_cache, v_cache, slot_mapping, options: KernelOptions) -> None:
    """K/V into the cache without RoPE (models with learned positions)."""
    from nanovllm.kernels import rope_kv_store

    rope_kv_store.store_kv(key, value, k_cache, v_cache, slot_mapping, pdl=options.pdl)


def paged_attention(query, k_cache, v_cache, ctx: ForwardContext, scale: float, sliding_window: Optional[int],
                    options: KernelOptions, softcap: Optional[float] = None) -> torch.Tensor:
    """Attention of the batch's new tokens over the paged cache described by ctx: [T, H, D]."""
    from nanovllm.kernels import paged_attention as pa

    return pa.paged_attention(
        query, k_cache, v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, scale,
        sliding_window=sliding_window, max_query_len=ctx.max_query_len, max_seq_len=ctx.max_seq_len,
        pdl=options.pdl, softcap=softcap,
    )


def cascade_attention(query, k_cache, v_cache, ctx: ForwardContext, scale: float,
                      options: KernelOptions) -> torch.Tensor:
    """Attention of the batch with ctx.cascade's shared prefixes read once per tile: [T, H, D]."""
    from nanovllm.kernels import cascade_attention as ca

    plan = ctx.cascade
    return ca.cascade_attention(
        query, k_cache, v_cache, ctx.query_start_loc, ctx.block_tables, plan.suffix_block_tables,
        plan.suffix_seq_lens, plan.tiles, plan.query_rows, plan.queries_per_tile, scale,
        max_query_len=ctx.max_query_len, max_suffix_len=plan.max_suffix_len, max_shared_len=plan.max_shared_len,
        num_splits=plan.num_splits, pdl=options.pdl,
    )
