"""Triton (q/k RMSNorm +) RoPE + KV store vs `reference.rope_and_store_kv` / `reference.store_kv`.

CPU: interpreter, fp32; fp16 too for the small cases (the full fp16 matrix passes in the
interpreter but takes ~2 minutes there). GPU (`@pytest.mark.gpu`): bf16 / fp16 inputs, larger
token counts.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.rope_kv_store import rope_and_store_kv, store_kv

from kernel_params import DEVICE, PRECISIONS, PRECISIONS_CPU_FP16, large_shapes

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


def check(out: torch.Tensor, ref: torch.Tensor, normed: bool = False) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    elif not normed:  # same fp32 math, one rounding: at most an ulp apart
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    else:  # as test_rmsnorm: rsqrt rounding can move the normalised value an ulp before RoPE
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)


def norm_weight(head_dim: int, dtype, seed: int) -> torch.Tensor:
    """A q_norm / k_norm weight: around 1, like a trained one, but not all ones."""
    gen = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm_rope"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (16, 8)])
@pytest.mark.parametrize("num_tokens", [1, 7, 40])
def test_rope_and_store_kv_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, rotary, qk_norm, dtype):
    if large_shapes(dtype):
        num_tokens *= 50
    elif qk_norm and DEVICE == "cpu" and num_tokens > 7:
        pytest.skip("interpreter runtime: the norm is per token, 1 and 7 tokens (padding included) cover it")
    rotary_dim = head_dim if rotary == "full" else head_dim // 2
    block_size = 16
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(
        num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=num_tokens + head_dim + num_heads
    )
    cache = cos_sin_cache(rotary_dim)
    norm = {}
    if qk_norm:  # Qwen3: per-head RMSNorm of q and k, fused in front of the RoPE
        norm = {"q_norm_weight": norm_weight(head_dim, dtype, 1), "k_norm_weight": norm_weight(head_dim, dtype, 2),
                "norm_eps": 1e-6}
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    ref_q, ref_k = reference.rope_and_store_kv(q.clone(), k.clone(), v.clone(), pos, cache, ref_kc, ref_vc, slots,
                                               **norm)
    out_q, out_k = rope_and_store_kv(q, k, v, pos, cache, k_cache, v_cache, slots, **norm)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    check(out_q, ref_q, qk_norm)  # partial rotary: the unrotated tail too (normalised when qk_norm)
    check(out_k, ref_k, qk_norm)
    check(k_cache, ref_kc, qk_norm)  # untouched slots (incl. the -1 tokens) unchanged
    check(v_cache, ref_vc)


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("which", ["q", "k"])
def test_norm_of_one_side_only_without_store(which, dtype):
    """q_norm / k_norm are independent; no cache: normalise + rotate only, partial rotary, head_dim 96."""
    q, k, v, pos, _, k_cache, _ = make_inputs(5, 6, 2, 96, 16, dtype, seed=3)
    cache = cos_sin_cache(32)
    norm = {f"{which}_norm_weight": norm_weight(96, dtype, 4), "norm_eps": 1e-5}
    ref_q, ref_k = reference.rope_and_store_kv(q.clone(), k.clone(), v.clone(), pos, cache, None, None, None, **norm)
    before = k_cache.clone()
    out_q, out_k = rope_and_store_kv(q, k, v, pos, cache, None, None, None, **norm)
    check(out_q, ref_q, normed=which == "q")
    check(out_k, ref_k, normed=which == "k")
    assert torch.equal(k_cache, before)


def test_norm_weight_shape_is_checked():
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(2, 4, 2, 64, 16, torch.float32, seed=5)
    with pytest.raises(ValueError, match="q_norm_weight"):
        rope_and_store_kv(q, k, v, pos, cos_sin_cache(64), k_cache, v_cache, slots,
                          q_norm_weight=torch.ones(32, device=DEVICE))


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
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


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_matches_reference(block_size, dtype):
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(23, 8, 2, 128, block_size, dtype, seed=2)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, ref_kc, ref_vc, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_kc) and torch.equal(v_cache, ref_vc)
