"""The CPU fast paths of layers/ops.py and the attention torch backend give the reference's
values: they only take fewer ops (batch-1 decode pays per op), never other arithmetic."""

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.layers import ops
from nanovllm.layers.attention import torch_backend


@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 64), (33, 1000)])
def test_fp32_rms_norms_equal_the_reference_bit_for_bit(rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, hidden, generator=g) * 3, torch.randn(rows, hidden, generator=g)
    weight = torch.randn(hidden, generator=g)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))
    got, got_res = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    want, want_res = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(got_res, want_res) and torch.equal(got, want)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_q_and_k_of_one_qkv_projection_rotate_together_as_apart(rotary_dim):
    """q and k split from one qkv tensor take the joint rotation; the result and the cache
    equal the reference's, with padding slots (-1) left untouched."""
    g = torch.Generator().manual_seed(rotary_dim)
    tokens, heads, kv_heads, head_dim, block_size, num_blocks = 5, 6, 2, 16, 4, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    assert torch_backend._packed_qk(q, k) is not None  # the joint path runs
    assert torch_backend._packed_qk(q, v) is None  # v does not follow q
    cos_sin = torch.randn(32, rotary_dim, generator=g)
    positions = torch.tensor([0, 4, 5, 9, 2])
    for slots in (torch.tensor([3, 7, 8, 12, 0]), torch.tensor([3, -1, 8, 12, 0])):
        kc_ref, vc_ref = (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) for _ in range(2))
        kc, vc = kc_ref.clone(), vc_ref.clone()
        q_ref, k_ref = reference.rope_and_store_kv(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
        q_got, k_got = torch_backend.rope_and_store_kv(q, k, v, positions, cos_sin, kc, vc, slots, {})
        assert torch.equal(q_got, q_ref) and torch.equal(k_got, k_ref)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
