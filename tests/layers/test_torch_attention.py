"""The CPU attention path equals the reference on mixed prefill/decode batches."""

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.layers import torch_attention


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
