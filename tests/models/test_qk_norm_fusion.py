"""Qwen3's q/k RMSNorm: fused into the Triton RoPE + KV-store kernel, same result as unfused.

The fused path is taken where the RoPE runs in Triton (CUDA); here it is forced on CPU
(`ops.use_triton` -> True, kernel under TRITON_INTERPRET, fp32) and compared with the
CPU torch path, which keeps the separate norms. Attention itself stays on the torch path
(the layer's `KernelOptions.triton_attention` is off).
"""

from types import SimpleNamespace

import pytest
import torch

from nanovllm.kernels import rope_kv_store
from nanovllm.layers import ops
from nanovllm.layers.forward_context import ForwardContext
from nanovllm.layers.kernel_options import KernelOptions
from nanovllm.layers.rotary import build_cos_sin_cache
from nanovllm.models.llama import DecoderAttention

BLOCK_SIZE = 4


def make_layer(head_dim: int, partial: float) -> DecoderAttention:
    cfg = SimpleNamespace(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                          rms_norm_eps=1e-6, rope_theta=10000.0, partial_rotary_factor=partial)
    layer = DecoderAttention(cfg, qkv_bias=False, qk_norm=True)
    g = torch.Generator().manual_seed(head_dim)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return layer, build_cos_sin_cache(cfg, head_dim, 64)


def make_ctx(q_lens, seq_lens, max_blocks=4):
    """Mixed batch: sequence i has seq_lens[i] - q_lens[i] cached tokens and q_lens[i] new ones."""
    positions, slots, qsl = [], [], [0]
    block_tables = torch.arange(len(q_lens) * max_blocks, dtype=torch.int32).flip(0).view(len(q_lens), max_blocks)
    for i, (n, s) in enumerate(zip(q_lens, seq_lens)):
        for p in range(s - n, s):
            positions.append(p)
            slots.append(int(block_tables[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE)
        qsl.append(qsl[-1] + n)
    return ForwardContext(
        positions=torch.tensor(positions), slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens), block_tables=block_tables, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), num_seqs=len(q_lens), query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens),
    )


@pytest.mark.parametrize("head_dim,partial", [(32, 1.0), (64, 0.5)])
def test_fused_qk_norm_matches_unfused_cpu_path(head_dim, partial, monkeypatch):
    layer, cos_sin = make_layer(head_dim, partial)
    layer.attn.kernel_options = KernelOptions(triton_attention=False)  # only RoPE/norm/store are under test
    ctx = make_ctx(q_lens=[5, 1], seq_lens=[5, 7])
    hidden = torch.randn(6, 48, generator=torch.Generator().manual_seed(1))
    num_blocks = 2 * 4
    g = torch.Generator().manual_seed(2)
    caches = [torch.randn(num_blocks, 2, BLOCK_SIZE, head_dim, generator=g) for _ in range(2)]

    layer.attn.k_cache, layer.attn.v_cache = caches[0].clone(), caches[1].clone()
    expected = layer(layer.qkv_proj(hidden), ctx.positions, cos_sin, ctx)  # CPU: q_norm, k_norm, then RoPE + store
    expected_kc, expected_vc = layer.attn.k_cache, layer.attn.v_cache

    calls = []
    fused = rope_kv_store.rope_and_store_kv

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fused(*args, **kwargs)

    def no_separate_norm(*args, **kwargs):
        raise AssertionError("q/k norm ran as its own op on the fused path")

    monkeypatch.setattr(ops, "use_triton", lambda x, options=None: True)
    monkeypatch.setattr(ops, "rms_norm", no_separate_norm)
    monkeypatch.setattr(rope_kv_store, "rope_and_store_kv", spy)
    layer.attn.k_cache, layer.attn.v_cache = caches[0].clone(), caches[1].clone()
    ctx.scratch.clear()
    got = layer(layer.qkv_proj(hidden), ctx.positions, cos_sin, ctx)

    assert len(calls) == 1 and calls[0]["q_norm_weight"] is layer.q_norm.weight
    assert calls[0]["k_norm_weight"] is layer.k_norm.weight and calls[0]["norm_eps"] == 1e-6
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.attn.k_cache, expected_kc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.attn.v_cache, expected_vc, atol=1e-5, rtol=1e-5)
