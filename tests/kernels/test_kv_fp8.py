"""FP8 (e4m3) KV cache: the Triton store and attention kernels against the torch reference.

CPU: the kernels run under TRITON_INTERPRET=1 with fp32 queries and keys and an fp8 cache (the
interpreter loads and stores torch.float8_e4m3fn; its own float -> e4m3 conversion mis-rounds
values that carry into the next binade, which the store kernels never hand it: they round
first, `_round_e4m3`). GPU (`@pytest.mark.gpu`): bf16 inputs, larger shapes.

What must hold:
- the rounding is torch's (nearest, ties to even, saturating at 448), bit for bit;
- the store kernels write the bits `reference.store_kv` / `reference.rope_and_store_kv` write;
- attention over an fp8 cache (unified, uniform split-KV, balanced plan) matches the reference
  attention over the same fp8 cache (which dequantizes in fp32), and stays within a few
  percent of attention over the unquantized cache.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from nanovllm.kernels import decode_plan, kv_quant, reference
from nanovllm.kernels.paged_attention import paged_attention, paged_attention_decode
from nanovllm.kernels.rope_kv_store import _round_e4m3, rope_and_store_kv, store_kv

from kernel_params import DEVICE, PRECISIONS, large_shapes
from test_paged_attention import make_batch
from test_rope_kv_store import cos_sin_cache, make_inputs, norm_weight

FP8 = kv_quant.FP8_DTYPE
FP32_ATOL = 1e-4
LOW_PRECISION_REL = 2e-2
QUANTIZATION_REL = 0.08  # e4m3 keeps 3 mantissa bits: attention outputs move by a few percent


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, _round_e4m3(x).to(out_ptr.dtype.element_ty), mask=ok)


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3 value (both signs)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    return codes[torch.isfinite(codes)].unique()


def test_round_e4m3_is_torchs_rounding_bit_for_bit():
    values = e4m3_values()
    pos = values[values >= 0]
    mids = (pos[1:] + pos[:-1]) / 2  # exact ties: half go up, half down (to the even code)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        values, mids, -mids,
        mids * (1 + 1e-6), mids * (1 - 1e-6),  # just above / below a tie
        torch.randn(4000, generator=gen) * 30, torch.randn(2000, generator=gen) * 1e-2,  # normals, subnormals
        torch.tensor([448.0, 449.0, 463.9, 464.0, 1e6, -1e6, 0.0, -0.0, 1e-30]),  # saturation, zeros
    ])
    out = torch.empty(x.shape[0], dtype=FP8, device=DEVICE)
    block = 1024
    _round_kernel[(triton.cdiv(x.shape[0], block),)](x.to(DEVICE), out, x.shape[0], BLOCK=block)
    expected = x.clamp(-kv_quant.FP8_E4M3_MAX, kv_quant.FP8_E4M3_MAX).to(FP8)
    assert torch.equal(out.cpu().view(torch.uint8), expected.view(torch.uint8))


def random_kv_scale(num_kv_heads: int, seed: int) -> torch.Tensor:
    """Per-head scales that put the largest values of a randn tensor near, but not at, 448."""
    gen = torch.Generator().manual_seed(seed)
    k = 0.008 * (1 + torch.rand(num_kv_heads, generator=gen))
    v = 0.008 * (1 + torch.rand(num_kv_heads, generator=gen))
    return kv_quant.kv_scale_tensor(k, v).to(DEVICE)


def fp8_cache_like(cache: torch.Tensor) -> torch.Tensor:
    return torch.randn(cache.shape, generator=torch.Generator().manual_seed(7)).to(FP8).to(DEVICE)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_fp8_matches_reference(block_size, dtype):
    num_tokens = 400 if large_shapes(dtype) else 23
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(num_tokens, 8, 2, 128, block_size, dtype, seed=3)
    kc, vc = fp8_cache_like(k_cache), fp8_cache_like(v_cache)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    scale = random_kv_scale(2, seed=1)
    reference.store_kv(k, v, ref_kc, ref_vc, slots, kv_scale=scale)
    store_kv(k, v, kc, vc, slots, kv_scale=scale)
    assert torch.equal(kc.view(torch.uint8), ref_kc.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ref_vc.view(torch.uint8))


def within_one_code(a: torch.Tensor, b: torch.Tensor) -> None:
    """fp8 tensors equal up to one e4m3 step where their fp32 inputs differed in the last bits."""
    fa, fb = a.float(), b.float()
    ulp = torch.exp2(torch.floor(torch.log2(fb.abs().clamp_min(2.0**-6))) - 3)  # quantum at b
    assert ((fa - fb).abs() <= ulp * 1.0001).all()
    assert (fa == fb).float().mean() > 0.99


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm_rope"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
def test_rope_and_store_kv_fp8_matches_reference(rotary, qk_norm, dtype):
    num_tokens = 300 if large_shapes(dtype) else 7
    head_dim, num_heads, num_kv_heads = 64, 8, 2
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(num_tokens, num_heads, num_kv_heads, head_dim, 16, dtype,
                                                        seed=11)
    rotary_dim = head_dim if rotary == "full" else head_dim // 2
    cache = cos_sin_cache(rotary_dim)
    norm = {}
    if qk_norm:
        norm = {"q_norm_weight": norm_weight(head_dim, dtype, 1), "k_norm_weight": norm_weight(head_dim, dtype, 2),
                "norm_eps": 1e-6}
    scale = random_kv_scale(num_kv_heads, seed=2)
    kc, vc = fp8_cache_like(k_cache), fp8_cache_like(v_cache)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    q0, k0 = q.clone(), k.clone()  # the kernel rotates q and k in place
    rq, rk = reference.rope_and_store_kv(q.clone(), k.clone(), v, pos, cache, ref_kc, ref_vc, slots, **norm,
                                         kv_scale=scale)
    oq, ok = rope_and_store_kv(q, k, v, pos, cache, kc, vc, slots, **norm, kv_scale=scale)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok.float(), rk.float(), **tol)  # k itself: RoPE only
    torch.testing.assert_close(oq.float(), rq.float(), **tol)  # q: RoPE, then H q for a full rotary head
    if rotary == "full":  # q and the stored k are rotated alike: q.k is unchanged
        h = kv_quant.hadamard(head_dim, q.device)
        torch.testing.assert_close(oq.float() @ h, rq.float() @ h, **tol)
        plain_q, _ = reference.rope_and_store_kv(q0, k0, v, pos, cache, None, None, None, **norm)
        torch.testing.assert_close(rq.float() @ h, plain_q.float(), **tol)
    within_one_code(kc, ref_kc)  # keys: rotated in each implementation's own fp32 order first
    assert torch.equal(vc.view(torch.uint8), ref_vc.view(torch.uint8))  # values: the same products


def test_fp8_cache_without_scales_is_refused():
    q, k, v, pos, slots, k_cache, v_cache = make_inputs(3, 4, 2, 64, 16, torch.float32, seed=0)
    kc, vc = fp8_cache_like(k_cache), fp8_cache_like(v_cache)
    with pytest.raises(ValueError, match="kv_scale"):
        store_kv(k, v, kc, vc, slots)
    with pytest.raises(ValueError, match="kv_scale"):
        store_kv(k, v, kc, vc, slots, kv_scale=torch.ones(2, 2, device=DEVICE))


def quantized_batch(q_lens, seq_lens, dtype, seed, num_heads=4, head_dim=64):
    """make_batch with its caches stored as fp8 through reference.store_kv (the store's semantics)."""
    query, k_cache, v_cache, qsl, sl, bt = make_batch(q_lens, seq_lens, num_heads, 2, head_dim, 16, torch.float32,
                                                      DEVICE, seed)
    scale = random_kv_scale(2, seed)
    blocks, heads, bs, d = k_cache.shape
    k8 = torch.empty(k_cache.shape, dtype=FP8, device=DEVICE)
    v8 = torch.empty_like(k8)
    slots = torch.arange(blocks * bs, device=DEVICE)
    flat = lambda c: c.permute(0, 2, 1, 3).reshape(-1, heads, d)  # [slots, Hkv, D]
    reference.store_kv(flat(k_cache), flat(v_cache), k8, v8, slots, kv_scale=scale)
    return query.to(dtype), k_cache, v_cache, k8, v8, scale, qsl, sl, bt


def check_attention(out, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)
    else:
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < LOW_PRECISION_REL


MIXES = {
    "small": {"prefill": ([13, 40], [13, 40]), "mixed": ([9, 1, 1], [30, 17, 90]), "decode": ([1] * 4, [1, 16, 70, 130])},
    "large": {"prefill": ([300, 900], [300, 900]), "mixed": ([128, 1, 1], [700, 2048, 5]),
              "decode": ([1] * 6, [1, 100, 1023, 4096, 2000, 17])},
}


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("mix", ["prefill", "mixed", "decode"])
def test_attention_over_fp8_cache_matches_reference(mix, dtype):
    q_lens, seq_lens = MIXES["large" if large_shapes(dtype) else "small"][mix]
    query, k_cache, v_cache, k8, v8, scale, qsl, sl, bt = quantized_batch(q_lens, seq_lens, dtype, seed=5)
    ref = reference.paged_attention(query, k8, v8, qsl, sl, bt, 0.125, kv_scale=scale)
    outs = {"unified": paged_attention(query, k8, v8, qsl, sl, bt, 0.125, kv_scale=scale)}
    if mix == "decode":
        outs["split"] = paged_attention_decode(query, k8, v8, sl, bt, 0.125, num_splits=3, kv_scale=scale)
        plan = decode_plan.build_plan(sl.cpu().numpy(), 2 * len(seq_lens), 64)
        outs["balanced"] = paged_attention_decode(query, k8, v8, sl, bt, 0.125, kv_scale=scale,
                                                  plan=torch.from_numpy(plan).to(DEVICE))
    for name, out in outs.items():
        check_attention(out, ref, dtype)
    # and the quantization error itself stays small against the unquantized cache
    exact = reference.paged_attention(query, k_cache.to(dtype), v_cache.to(dtype), qsl, sl, bt, 0.125)
    err = ((outs["unified"].float() - exact.float()).norm() / exact.float().norm()).item()
    assert err < QUANTIZATION_REL


def dequantized(cache8: torch.Tensor, scale: torch.Tensor, row: int) -> torch.Tensor:
    """[blocks, Hkv, block_size, D] fp32 values an fp8 cache stands for."""
    return kv_quant.dequantize(cache8, scale[row], head_dim=1)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("variant", ["softcap", "window"])
@pytest.mark.parametrize("mix", ["mixed", "decode"])
def test_fp8_cache_with_softcap_window_and_lse(mix, variant, dtype):
    """The per-layer options (Gemma 2's soft-cap, sliding windows) and the log-sum-exp output that
    split and cascade merges read stay right over an fp8 cache: the K scale is folded into the
    score scale before the cap, so scores and log-sum-exps are the dequantized cache's."""
    q_lens, seq_lens = MIXES["large" if large_shapes(dtype) else "small"][mix]
    query, _, _, k8, v8, scale, qsl, sl, bt = quantized_batch(q_lens, seq_lens, dtype, seed=9)
    kw = {"softcap": 0.5} if variant == "softcap" else {"sliding_window": 20}
    kd, vd = dequantized(k8, scale, kv_quant.K_SCALE), dequantized(v8, scale, kv_quant.V_SCALE)
    ref = reference.paged_attention(query, kd, vd, qsl, sl, bt, 0.125, **kw)
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=DEVICE)
    out = paged_attention(query, k8, v8, qsl, sl, bt, 0.125, kv_scale=scale, lse_out=lse, **kw)
    check_attention(out, ref, dtype)
    if variant == "window":  # the lse reference has no soft-cap
        ref_lse = reference.paged_attention_lse(query, kd, vd, qsl, sl, bt, 0.125, sliding_window=20)
        torch.testing.assert_close(lse, ref_lse, atol=1e-3 if dtype == torch.float32 else 2e-2, rtol=1e-3)
    if mix == "decode":
        outs = [paged_attention_decode(query, k8, v8, sl, bt, 0.125, num_splits=3, kv_scale=scale, **kw)]
        plan = decode_plan.build_plan(sl.cpu().numpy(), 2 * len(seq_lens), 64)
        outs.append(paged_attention_decode(query, k8, v8, sl, bt, 0.125, kv_scale=scale,
                                           plan=torch.from_numpy(plan).to(DEVICE), **kw))
        for o in outs:
            check_attention(o, ref, dtype)
