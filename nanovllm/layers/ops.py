"""Kernel dispatch: Triton on CUDA tensors, the pure-torch reference everywhere else.

Each op has the same signature in `kernels/reference.py` and in its Triton module, so a
layer calls `ops.X(...)` and the tensor's device picks the implementation.
`NANOVLLM_DISABLE_TRITON=1` forces the reference (debugging, A/B checks).
"""

from __future__ import annotations

import functools
import os

import torch

from nanovllm.kernels import reference


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    if os.environ.get("NANOVLLM_DISABLE_TRITON") == "1" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def rms_norm(x, weight, eps):
    if _use_triton(x):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    if _use_triton(x):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x):
    if _use_triton(x):
        from nanovllm.kernels import activation

        return activation.silu_and_mul(x)
    return reference.silu_and_mul(x)


def rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, ctx=None):
    if _use_triton(query):
        from nanovllm.kernels import rope_kv_store

        return rope_kv_store.rope_and_store_kv(
            query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
        )
    if not query.is_cuda and ctx is not None:
        from nanovllm.layers import torch_attention

        return torch_attention.rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache,
                                                 slot_mapping, ctx.scratch)
    return reference.rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, ctx, scale, sliding_window=None, use_triton=True):
    """Attention of the batch's new tokens over the paged cache described by ctx (a ForwardContext)."""
    if use_triton and _use_triton(query):
        from nanovllm.kernels import paged_attention as pa

        return pa.paged_attention(
            query, k_cache, v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, scale,
            sliding_window=sliding_window, max_query_len=ctx.max_query_len, max_seq_len=ctx.max_seq_len,
        )
    if not query.is_cuda and ctx.query_start_loc_cpu is not None:
        from nanovllm.layers import torch_attention

        return torch_attention.paged_attention(
            query, k_cache, v_cache, ctx.query_start_loc_cpu, ctx.seq_lens_cpu, ctx.block_tables, scale,
            sliding_window=sliding_window, scratch=ctx.scratch,
        )
    return reference.paged_attention(
        query, k_cache, v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, scale,
        sliding_window=sliding_window,
    )
