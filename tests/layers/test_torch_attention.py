"""The CPU attention path equals the reference on mixed prefill/decode batches."""

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.layers.attention import torch_backend as torch_attention


def make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    num_blocks = max_blocks * len(seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=g)[: max_blocks * len(seq_lens)]
    block_tables = perm.view(len(seq_lens), max_blocks).to(torch.int32)
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], num_heads, head_dim, generator=g)
    return q, k_cache, v_cache, qsl, block_tables


@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("q_lens,seq_lens", [
    ([1, 1, 1], [1, 17, 40]),  # decode only
    ([7, 12], [7, 12]),  # fresh prefills
    ([5, 1, 9, 1], [21, 33, 9, 2]),  # prefill over a cached prefix, chunk, decode mixed
])
def test_matches_reference(q_lens, seq_lens, num_heads, num_kv_heads, sliding_window):
    head_dim, block_size, scale = 16, 4, 0.25
    q, kc, vc, qsl, bt = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, seed=len(q_lens))
    expected = reference.paged_attention(q, kc, vc, torch.tensor(qsl), torch.tensor(seq_lens), bt, scale, sliding_window)
    got = torch_attention.paged_attention(q, kc, vc, qsl, seq_lens, bt, scale, sliding_window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rope_and_store_matches_reference_and_reuses_scratch(rotary_fraction):
    g = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, head_dim, block_size, num_blocks = 7, 4, 2, 16, 4, 6
    rot = int(head_dim * rotary_fraction)
    cos_sin = torch.randn(64, rot, generator=g)
    q = torch.randn(tokens, heads, head_dim, generator=g)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g)
    positions = torch.tensor([3, 9, 10, 11, 0, 1, 2])
    slots = torch.tensor([5, 13, -1, 2, 20, 21, 22])  # -1: padding, never written
    caches = [torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) for _ in range(4)]
    kc_ref, vc_ref, kc, vc = caches[0], caches[1], caches[0].clone(), caches[1].clone()
    q_ref, k_ref = reference.rope_and_store_kv(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
    scratch = {}
    for _ in range(2):  # second call reuses the per-step values
        q_got, k_got = torch_attention.rope_and_store_kv(q, k, v, positions, cos_sin, kc, vc, slots, scratch)
        torch.testing.assert_close(q_got, q_ref)
        torch.testing.assert_close(k_got, k_ref)
    torch.testing.assert_close(kc, kc_ref)
    torch.testing.assert_close(vc, vc_ref)
