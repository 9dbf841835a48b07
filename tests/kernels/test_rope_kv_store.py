"""Triton RoPE + KV store vs `reference.rope_and_store_kv` / `reference.store_kv`.

CPU: interpreter, fp32. GPU (`@pytest.mark.gpu`): bf16 / fp16 inputs, larger token counts.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.rope_kv_store import rope_and_store_kv, store_kv

from kernel_params import DEVICE, PRECISIONS

MAX_POSITIONS = 8192
ROPE_THETA = 10000.0


def cos_sin_cache(rotary_dim: int, dtype=torch.float32) -> torch.Tensor:
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(MAX_POSITIONS, dtype=torch.float32), inv_freq)  # [P, rot/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE, dtype)  # [P, rot]


def make_inputs(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """q/k/v as strided views of one fused qkv buffer (the layout the model produces)."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(DEVICE, dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    num_blocks = (num_tokens + block_size - 1) // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens: rotated, never stored
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen)
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn_like(k_cache)
    return q, k, v, positions.to(DEVICE), slots.to(DEVICE), k_cache, v_cache


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # same fp32 math, one rounding: at most an ulp apart
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (16, 8)])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_rope_and_store_kv_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, rotary, dtype):
    if dtype != torch.float32:
        num_tokens *= 50
    rotary_dim = head_dim if rotary == "full" else head_dim // 2
    block_size = 16
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(
        num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=num_tokens + head_dim + num_heads
    )
    cache = cos_sin_cache(rotary_dim)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    ref_q, ref_k = reference.rope_and_store_kv(q.clone(), k.clone(), v.clone(), pos, cache, ref_kc, ref_vc, slots)
    out_q, out_k = rope_and_store_kv(q, k, v, pos, cache, k_cache, v_cache, slots)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    check(out_q, ref_q)
    check(out_k, ref_k)
    check(k_cache, ref_kc)  # untouched slots (incl. the -1 tokens) unchanged
    check(v_cache, ref_vc)


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_rope_with_low_precision_cos_sin_cache_and_no_store(dtype):
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(9, 4, 2, 64, 16, dtype, seed=1)
    cache = cos_sin_cache(64, dtype=torch.bfloat16)
    ref_q = reference.apply_rope(q.clone(), pos, cache)
    ref_k = reference.apply_rope(k.clone(), pos, cache)
    before = k_cache.clone()
    out_q, out_k = rope_and_store_kv(q, k, v, pos, cache, None, None, None)
    check(out_q, ref_q)
    check(out_k, ref_k)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_matches_reference(block_size, dtype):
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(23, 8, 2, 128, block_size, dtype, seed=2)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, ref_kc, ref_vc, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_kc) and torch.equal(v_cache, ref_vc)
