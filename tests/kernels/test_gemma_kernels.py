"""The Gemma variants of the Triton kernels vs their references: GeGLU (gelu_tanh-and-mul),
the (1 + w) RMSNorm with and without the residual add, and soft-capped paged attention with
per-layer sliding windows (prefill / mixed batches and the split-KV decode path).

CPU: interpreter, fp32 (and fp16 for the elementwise kernels). GPU: bf16 (`@pytest.mark.gpu`).
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.activation import gelu_tanh_and_mul
from nanovllm.kernels.paged_attention import paged_attention, paged_attention_decode
from nanovllm.kernels.rmsnorm import fused_add_rms_norm, rms_norm

from kernel_params import DEVICE, PRECISIONS, PRECISIONS_CPU_FP16, large_shapes
from test_paged_attention import MIXES_LARGE, MIXES_SMALL, NUM_KV_HEADS, assert_close, make_batch

EPS = 1e-6
SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping
WINDOW_SMALL, WINDOW_LARGE = 20, 700


def rand(*shape, dtype, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def check(out, ref, atol=1e-5):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("shape", [(1, 2 * 96), (9, 2 * 1000), (2, 3, 2 * 64)])
def test_gelu_tanh_and_mul_matches_reference(shape, dtype):
    if large_shapes(dtype):
        shape = (shape[0] * 64, *shape[1:])
    x = rand(*shape, dtype=dtype, seed=shape[-1], scale=4.0)  # both tails of tanh saturate
    x.view(-1)[:2] = torch.tensor([40.0, -40.0], dtype=dtype)
    check(gelu_tanh_and_mul(x), reference.gelu_tanh_and_mul(x))


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(1, 1152), (7, 640), (4, 3, 256)])
def test_gemma_rms_norm_matches_reference(shape, residual, dtype):
    if large_shapes(dtype):
        shape = (shape[0] * 64, *shape[1:])
    x = rand(*shape, dtype=dtype, seed=1)
    weight = rand(shape[-1], dtype=dtype, seed=2, scale=0.3)  # stored as w - 1: small values
    if not residual:
        check(rms_norm(x, weight, EPS, unit_offset=True), reference.gemma_rms_norm(x, weight, EPS))
        return
    res = rand(*shape, dtype=dtype, seed=3)
    out, new_res = fused_add_rms_norm(x, res, weight, EPS, unit_offset=True)
    ref_out, ref_res = reference.gemma_fused_add_rms_norm(x, res, weight, EPS)
    check(out, ref_out)
    check(new_res, ref_res)


def test_gemma_norm_differs_from_llama_norm():
    """The (1 + w) variant is a different function (a kernel ignoring the switch would fail here)."""
    x, w = rand(3, 64, dtype=torch.float32, seed=4), rand(64, dtype=torch.float32, seed=5)
    assert not torch.allclose(rms_norm(x, w, EPS, unit_offset=True), rms_norm(x, w, EPS))
    torch.testing.assert_close(rms_norm(x, w, EPS, unit_offset=True), rms_norm(x, w + 1, EPS), atol=1e-5, rtol=1e-5)


def reference_capped(query, k_cache, v_cache, qsl, lens, tables, scale, window, softcap):
    return reference.paged_attention(query.float(), k_cache.float(), v_cache.float(), qsl, lens, tables, scale,
                                     sliding_window=window, softcap=softcap)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("window", [None, "on"], ids=["global", "local"])
@pytest.mark.parametrize("mix", ["prefill", "prefix", "mixed", "decode"])
@pytest.mark.parametrize("group", [1, 4])
def test_softcapped_attention_matches_reference(group, mix, window, dtype):
    large = large_shapes(dtype)
    q_lens, seq_lens = (MIXES_LARGE if large else MIXES_SMALL)[mix]
    window = None if window is None else (WINDOW_LARGE if large else WINDOW_SMALL)
    head_dim = 128 if large else 64
    query, k_cache, v_cache, qsl, lens, tables = make_batch(
        q_lens, seq_lens, NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, 16, dtype, DEVICE, seed=group + len(mix)
    )
    query = query * 4  # large scores: the cap bends them
    scale = 256**-0.5  # Gemma 2's query_pre_attn_scalar, not head_dim
    out = torch.full_like(query, float("nan"))
    paged_attention(query, k_cache, v_cache, qsl, lens, tables, scale, sliding_window=window, out=out,
                    max_query_len=max(q_lens), max_seq_len=max(seq_lens), softcap=SOFTCAP)
    ref = reference_capped(query, k_cache, v_cache, qsl, lens, tables, scale, window, SOFTCAP)
    assert_close(out, ref)
    uncapped = reference_capped(query, k_cache, v_cache, qsl, lens, tables, scale, window, None)
    assert (ref - uncapped).abs().max() > 1e-3, "the cap must matter for this test to mean anything"


@pytest.mark.parametrize("num_splits", [1, 4])
def test_softcapped_split_decode_matches_reference(num_splits):
    q_lens, seq_lens = MIXES_SMALL["decode"]
    query, k_cache, v_cache, qsl, lens, tables = make_batch(q_lens, seq_lens, 8, 2, 64, 16, torch.float32, DEVICE, 7)
    query = query * 4
    ref = reference_capped(query, k_cache, v_cache, qsl, lens, tables, 0.125, WINDOW_SMALL, 30.0)
    out = paged_attention_decode(query, k_cache, v_cache, lens, tables, 0.125, sliding_window=WINDOW_SMALL,
                                 num_splits=num_splits, softcap=30.0)
    assert_close(out, ref)


def test_softcap_must_be_positive():
    q_lens, seq_lens = [3], [3]
    query, k_cache, v_cache, qsl, lens, tables = make_batch(q_lens, seq_lens, 2, 2, 16, 16, torch.float32, DEVICE, 1)
    with pytest.raises(ValueError, match="softcap"):
        paged_attention(query, k_cache, v_cache, qsl, lens, tables, 0.25, softcap=0.0)


@pytest.mark.parametrize("mix", ["prefill", "prefix", "mixed", "decode"])
@pytest.mark.parametrize("window", [None, 8], ids=["global", "local"])
def test_softcapped_attention_at_tiny_gemma2_shapes(mix, window):
    """The tiny Gemma 2 of the model-family parity test: head_dim 16 (tl.dot's smallest), blocks of
    8 tokens, a cap of 5 that bends most scores, and the scale from query_pre_attn_scalar 24."""
    q_lens, seq_lens = MIXES_SMALL[mix]
    query, k_cache, v_cache, qsl, lens, tables = make_batch(q_lens, seq_lens, 4, 2, 16, 8, torch.float32, DEVICE,
                                                            seed=3 + len(mix))
    query = query * 4
    scale, softcap = 24**-0.5, 5.0
    out = torch.full_like(query, float("nan"))
    paged_attention(query, k_cache, v_cache, qsl, lens, tables, scale, sliding_window=window, out=out,
                    max_query_len=max(q_lens), max_seq_len=max(seq_lens), softcap=softcap)
    assert_close(out, reference_capped(query, k_cache, v_cache, qsl, lens, tables, scale, window, softcap))
