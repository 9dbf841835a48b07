"""Decode attention with the RoPE + KV store folded in (`paged_attention.rope_store_and_decode`)
vs `reference.rope_store_and_decode` (= `reference.rope_and_store_kv` then paged attention).

CPU: interpreter, fp32, small shapes. GPU (`@pytest.mark.gpu`): bf16 / fp16 and long contexts.
"""

from __future__ import annotations

import math

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.paged_attention import rope_store_and_decode, split_counters

from kernel_params import DEVICE, HAS_CUDA, PRECISIONS
from test_paged_attention import assert_close, make_batch
from test_rope_kv_store import check, cos_sin_cache, norm_weight

NUM_KV_HEADS = 2
BLOCK_SIZE = 16
LENS_SMALL = [1, 16, 17, 70, 130]  # first token, block boundaries, several tiles / splits
LENS_LARGE = [1, 100, 1023, 4096, 2000, 17]


def decode_inputs(seq_lens, num_heads, head_dim, dtype, seed):
    """A decode batch: raw q / k / v as views of one qkv buffer, each sequence's new token at
    position seq_len - 1 with its slot taken from the block table (the cache holds the older
    tokens; the new token's slot holds garbage until the kernel stores it)."""
    q_lens = [1] * len(seq_lens)
    _, k_cache, v_cache, _, lens, tables = make_batch(q_lens, seq_lens, num_heads, NUM_KV_HEADS, head_dim,
                                                      BLOCK_SIZE, dtype, DEVICE, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    width = (num_heads + 2 * NUM_KV_HEADS) * head_dim
    qkv = (3 * torch.randn(len(seq_lens), width, generator=gen)).to(DEVICE, dtype)  # un-normalised scale
    q_size, kv_size = num_heads * head_dim, NUM_KV_HEADS * head_dim
    q = qkv[:, :q_size].view(-1, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(-1, NUM_KV_HEADS, head_dim)
    v = qkv[:, q_size + kv_size :].view(-1, NUM_KV_HEADS, head_dim)
    positions, slots = new_token_slots(tables, seq_lens)
    return q, k, v, positions, slots, k_cache, v_cache, lens, tables


def new_token_slots(tables, seq_lens):
    """(positions, slots) of each sequence's new token: position seq_len - 1 in its block
    table; seq_len 0 (padding) -> position 0, slot -1."""
    table_cpu = tables.cpu()
    positions = [max(n - 1, 0) for n in seq_lens]
    slots = [int(table_cpu[i, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE if n > 0 else -1
             for i, (p, n) in enumerate(zip(positions, seq_lens))]
    return torch.tensor(positions, device=DEVICE), torch.tensor(slots, device=DEVICE)


def run_both(seq_lens, num_heads, head_dim, rotary_dim, qk_norm, dtype, seed, window=None, num_splits=None):
    q, k, v, pos, slots, k_cache, v_cache, lens, tables = decode_inputs(seq_lens, num_heads, head_dim, dtype, seed)
    norm = {}
    if qk_norm:
        norm = {"q_norm_weight": norm_weight(head_dim, dtype, 1), "k_norm_weight": norm_weight(head_dim, dtype, 2),
                "norm_eps": 1e-6}
    table = cos_sin_cache(rotary_dim)
    scale = head_dim ** -0.5
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    q_before, k_before = q.clone(), k.clone()
    ref = reference.rope_store_and_decode(q.float(), k.float(), v.float(), pos, table, ref_kc.float(),
                                          ref_vc.float(), slots, lens, tables, scale, window,
                                          **{n: w.float() if torch.is_tensor(w) else w for n, w in norm.items()})
    out = torch.full_like(q, float("nan"))
    rope_store_and_decode(q, k, v, pos, table, k_cache, v_cache, slots, lens, tables, scale, window, out=out,
                          num_splits=num_splits, **norm)
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "q / k are read, not rotated in place"
    # the cache as the unfused composition leaves it, in the cache dtype
    ref_kc2, ref_vc2 = k_cache.clone(), v_cache.clone()
    reference.rope_and_store_kv(q, k, v, pos, table, ref_kc2, ref_vc2, slots, **norm)
    return out, ref, (k_cache, v_cache), (ref_kc2, ref_vc2)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm_rope"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_store_and_decode_matches_reference(head_dim, group, rotary, qk_norm, dtype):
    if DEVICE == "cpu" and head_dim == 128 and (group != 2 or rotary == "partial"):
        pytest.skip("interpreter runtime: head_dim 128 once per norm setting")
    seq_lens = LENS_LARGE if dtype != torch.float32 else LENS_SMALL
    rotary_dim = head_dim if rotary == "full" else head_dim // 2
    out, ref, (kc, vc), (ref_kc, ref_vc) = run_both(seq_lens, group * NUM_KV_HEADS, head_dim, rotary_dim, qk_norm,
                                                    dtype, seed=head_dim + group)
    assert_close(out, ref)
    check(kc, ref_kc, qk_norm)  # the new tokens' slots rotated (normalised) as the unfused kernel does
    check(vc, ref_vc)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window"])
def test_every_split_count_stores_once_and_attends_to_the_new_token(num_splits, window):
    """The new token's K/V are stored by the one split that covers it, whatever the split
    count (1: direct output, more: merged), with and without a sliding window; the arrival
    counters are left at zero."""
    out, ref, (kc, vc), (ref_kc, ref_vc) = run_both(LENS_SMALL, 4, 64, 64, True, torch.float32, seed=7,
                                                    window=window, num_splits=num_splits)
    assert_close(out, ref)
    check(kc, ref_kc, True)
    check(vc, ref_vc)
    assert torch.all(split_counters(kc.device, len(LENS_SMALL) * NUM_KV_HEADS) == 0)


def test_padding_rows_store_nothing():
    """Graph padding: seq_len 0 and slot -1 give a zero output and leave the cache untouched."""
    seq_lens = [40, 1, 0, 0]
    q, k, v, pos, slots, k_cache, v_cache, lens, tables = decode_inputs(seq_lens, 4, 64, torch.float32, seed=3)
    assert slots[2:].tolist() == [-1, -1]
    table = cos_sin_cache(64)
    expected_kc, expected_vc = k_cache.clone(), v_cache.clone()
    reference.rope_and_store_kv(q[:2], k[:2], v[:2], pos[:2], table, expected_kc, expected_vc, slots[:2])
    out = rope_store_and_decode(q, k, v, pos, table, k_cache, v_cache, slots, lens, tables, 0.125,
                                max_seq_len=1024)
    assert torch.all(out[2:] == 0)
    check(k_cache, expected_kc)
    check(v_cache, expected_vc)


def test_inputs_are_checked():
    q, k, v, pos, slots, k_cache, v_cache, lens, tables = decode_inputs([5, 9], 4, 64, torch.float32, seed=1)
    table = cos_sin_cache(64)
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_store_and_decode(q, k, v, pos, cos_sin_cache(66)[:, :65], k_cache, v_cache, slots, lens, tables, 0.1)
    with pytest.raises(ValueError, match="one entry per sequence"):
        rope_store_and_decode(q, k, v, pos[:1], table, k_cache, v_cache, slots, lens, tables, 0.1)
    with pytest.raises(ValueError, match="do not match"):
        rope_store_and_decode(q, k[:, :1], v[:, :1], pos, table, k_cache, v_cache, slots, lens, tables, 0.1)
    with pytest.raises(ValueError, match="k_norm_weight"):
        rope_store_and_decode(q, k, v, pos, table, k_cache, v_cache, slots, lens, tables, 0.1,
                              k_norm_weight=torch.ones(32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_graph_replay_with_new_positions_and_slots():
    """Captured once with a length bound (as the engine's decode graphs), replayed over new
    lengths, positions, slots and raw q / k / v: output and cache right each time."""
    dtype, num_heads, head_dim, bound = torch.bfloat16, 16, 128, 4096
    seq_lens = [bound] * 4
    q, k, v, pos, slots, k_cache, v_cache, lens, tables = decode_inputs(seq_lens, num_heads, head_dim, dtype, 5)
    table = cos_sin_cache(head_dim)
    qn, kn = norm_weight(head_dim, dtype, 1), norm_weight(head_dim, dtype, 2)
    out = torch.empty_like(q)

    def step():
        rope_store_and_decode(q, k, v, pos, table, k_cache, v_cache, slots, lens, tables, head_dim**-0.5,
                              q_norm_weight=qn, k_norm_weight=kn, out=out, max_seq_len=bound)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for new_lens in ([1, 333, 4096, 64], [5, 0, 2000, 17]):
        new_pos, new_slots = new_token_slots(tables, new_lens)
        for static, new in ((lens, torch.tensor(new_lens, dtype=torch.int32)), (pos, new_pos), (slots, new_slots)):
            static.copy_(new)
        for static in (q, k, v):
            static.copy_(3 * torch.randn(static.shape, device="cuda", generator=gen))
        ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
        ref = reference.rope_store_and_decode(q.float(), k.float(), v.float(), pos, table, ref_kc.float(),
                                              ref_vc.float(), slots, lens, tables, head_dim**-0.5, None,
                                              qn.float(), kn.float())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        keep = [i for i, n in enumerate(new_lens) if n > 0]
        assert_close(out[keep], ref[keep])
        assert math.isfinite(out.float().abs().sum().item())
