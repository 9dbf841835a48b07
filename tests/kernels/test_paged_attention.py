"""Triton paged attention vs `reference.paged_attention` (and the split-KV merge vs its twin).

CPU: the kernels run under TRITON_INTERPRET=1 (set by conftest.py) in fp32 on small shapes
(the split merge in fp16 too; the fp16 attention matrix passes there but takes ~4 minutes).
GPU (`@pytest.mark.gpu`): bf16 / fp16 on contexts up to 4096, plus CUDA-graph capture of
the decode path with a fixed max_seq_len bound replayed over different seq_lens.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.paged_attention import (
    choose_num_splits,
    merge_attention_states,
    paged_attention,
    paged_attention_decode,
    merge_splits_per_load,
    split_counters,
)

from kernel_params import DEVICE, HAS_CUDA, PRECISIONS, PRECISIONS_CPU_FP16, large_shapes

NUM_KV_HEADS = 2
FP32_ATOL = 1e-4
LOW_PRECISION_REL = 2e-2  # bf16 / fp16: relative norm error

# (q_lens, seq_lens) per batch mix. Small shapes for the interpreter, large ones for GPUs.
MIXES_SMALL = {
    "prefill": ([1, 13, 67], [1, 13, 67]),  # 67 > 64 rows: several query tiles even at group 1
    "prefix": ([5, 19], [37, 60]),
    "chunked": ([20, 16, 9], [20, 52, 37]),  # first, middle and last chunk of prompts
    "decode": ([1, 1, 1, 1], [1, 16, 33, 130]),
    "mixed": ([30, 1, 1, 9, 0], [30, 1, 17, 50, 40]),  # incl. a sequence with no new token
}
MIXES_LARGE = {
    "prefill": ([1, 300, 1500], [1, 300, 1500]),
    "prefix": ([100, 777], [1000, 4096]),
    "chunked": ([512, 512, 200], [512, 2048, 3000]),  # first, middle and last chunk
    "decode": ([1] * 6, [1, 100, 1023, 4096, 2000, 17]),
    "mixed": ([600, 1, 1, 128, 0], [600, 4096, 1, 129, 3000]),
}
WINDOW_SMALL, WINDOW_LARGE = 24, 1000


def make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed):
    """Random queries / caches and shuffled, non-contiguous block tables for a varlen batch."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 7  # spare blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    # Unused table entries point at random (valid) blocks: a kernel reading past the end shows.
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        block_tables[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    to = dict(device=device)
    return (
        query.to(dtype=dtype, **to),
        k_cache.to(dtype=dtype, **to),
        v_cache.to(dtype=dtype, **to),
        qsl.to(**to),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables.to(**to),
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 outputs: elementwise at FP32_ATOL; bf16 / fp16 outputs: relative norm error."""
    assert not out.isnan().any(), "NaN in output (unwritten element?)"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref.float(), atol=FP32_ATOL, rtol=FP32_ATOL)
    else:
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < LOW_PRECISION_REL, f"relative error {err:.3e}"


def reference_attention(query, k_cache, v_cache, qsl, seq_lens, block_tables, scale, window):
    """The reference in fp32 on the same inputs (upcast), returned in fp32."""
    return reference.paged_attention(
        query.float(), k_cache.float(), v_cache.float(), qsl, seq_lens, block_tables, scale, sliding_window=window
    )




@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("window", [None, "on"], ids=["full", "window"])
@pytest.mark.parametrize("mix", list(MIXES_SMALL))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_matches_reference(head_dim, group, block_size, mix, window, dtype):
    if not HAS_CUDA and head_dim == 128 and block_size == 32:
        pytest.skip("interpreter time budget: head_dim 128 x block 32 runs on GPUs only")
    large = large_shapes(dtype)
    q_lens, seq_lens = (MIXES_LARGE if large else MIXES_SMALL)[mix]
    window = None if window is None else (WINDOW_LARGE if large else WINDOW_SMALL)
    seed = zlib.crc32(f"{head_dim}-{group}-{block_size}-{mix}-{window}-{dtype}".encode())
    query, k_cache, v_cache, qsl, lens, tables = make_batch(
        q_lens, seq_lens, NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, block_size, dtype, DEVICE, seed
    )
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))  # poison: every element must be written
    paged_attention(
        query, k_cache, v_cache, qsl, lens, tables, scale, sliding_window=window, out=out,
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )
    ref = reference_attention(query, k_cache, v_cache, qsl, lens, tables, scale, window)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("window", [None, "on"], ids=["full", "window"])
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_decode_splits_and_unified_agree(num_splits, window, dtype):
    """Decode batches: any split count, and the unified kernel on the same batch, match."""
    large = large_shapes(dtype)
    q_lens, seq_lens = (MIXES_LARGE if large else MIXES_SMALL)["decode"]
    window = None if window is None else (WINDOW_LARGE if large else WINDOW_SMALL)
    query, k_cache, v_cache, qsl, lens, tables = make_batch(
        q_lens, seq_lens, 8, NUM_KV_HEADS, 64, 16, dtype, DEVICE, seed=17 + (num_splits or 0)
    )
    ref = reference_attention(query, k_cache, v_cache, qsl, lens, tables, 0.125, window)
    out = paged_attention_decode(query, k_cache, v_cache, lens, tables, 0.125, sliding_window=window, num_splits=num_splits)
    assert_close(out, ref)
    unified = paged_attention(query, k_cache, v_cache, qsl, lens, tables, 0.125, sliding_window=window)  # no hint
    assert_close(unified, ref)


def test_decode_bound_larger_than_lengths_and_padding():
    """A fixed max_seq_len / num_splits bound far above the real lengths (as in a CUDA graph),
    and padded batch entries with seq_len 0 (zero output, no NaN)."""
    q_lens, seq_lens = [1] * 4, [3, 40, 1, 77]
    query, k_cache, v_cache, qsl, lens, tables = make_batch(q_lens, seq_lens, 4, 2, 64, 16, torch.float32, DEVICE, 5)
    ref = reference_attention(query, k_cache, v_cache, qsl, lens, tables, 0.2, None)
    out = paged_attention_decode(query, k_cache, v_cache, lens, tables, 0.2, max_seq_len=4096, num_splits=8)
    assert_close(out, ref)
    lens[2] = 0  # padding row
    out = paged_attention_decode(query, k_cache, v_cache, lens, tables, 0.2, max_seq_len=1024)
    assert torch.all(out[2] == 0)
    keep = [0, 1, 3]
    assert_close(out[keep], ref[keep])


@pytest.mark.parametrize("group,head_dim,splits", [(2, 64, (3, 5, 3)), (8, 128, (7, 2))],
                         ids=["one-load-merge", "chunked-merge"])
def test_split_merge_leaves_counters_zero_and_repeats(group, head_dim, splits):
    """The last split of each (seq, kv head) merges and re-zeroes its arrival counter, so
    back-to-back launches on one counter buffer (layers, graph replays) stay correct; with
    group 8 x head_dim 128 the merge loads its 7 splits in two register-sized chunks."""
    q_lens, seq_lens = [1] * 3, [70, 5, 129]
    query, k_cache, v_cache, qsl, lens, tables = make_batch(
        q_lens, seq_lens, 2 * group, 2, head_dim, 16, torch.float32, DEVICE, 9
    )
    assert merge_splits_per_load(max(splits), group, head_dim) < max(splits) or group == 2
    ref = reference_attention(query, k_cache, v_cache, qsl, lens, tables, 0.2, None)
    for num_splits in splits:
        out = torch.full_like(query, float("nan"))
        paged_attention_decode(query, k_cache, v_cache, lens, tables, 0.2, out=out, num_splits=num_splits)
        assert_close(out, ref)
        counters = split_counters(query.device, len(seq_lens) * 2)
        assert torch.all(counters == 0), f"counters left at {counters.tolist()}"


def test_strided_query_and_output():
    """q as a view of a fused qkv buffer, out as a strided view: no copies needed."""
    q_lens, seq_lens = [9, 1, 30], [20, 33, 30]
    num_heads, head_dim = 8, 64
    query, k_cache, v_cache, qsl, lens, tables = make_batch(
        q_lens, seq_lens, num_heads, 2, head_dim, 16, torch.float32, DEVICE, 3
    )
    qkv = torch.randn(query.shape[0], (num_heads + 4) * head_dim, device=DEVICE)
    q_view = qkv[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
    q_view.copy_(query)
    out_buf = torch.full((query.shape[0], num_heads, 2 * head_dim), float("nan"), device=DEVICE)
    out_view = out_buf[:, :, :head_dim]
    paged_attention(q_view, k_cache, v_cache, qsl, lens, tables, 0.125, out=out_view)
    ref = reference_attention(query, k_cache, v_cache, qsl, lens, tables, 0.125, None)
    assert_close(out_view, ref)


def test_non_power_of_two_group_and_small_head_dim():
    q_lens, seq_lens = [5, 1, 17], [5, 40, 60]
    query, k_cache, v_cache, qsl, lens, tables = make_batch(q_lens, seq_lens, 6, 2, 32, 32, torch.float32, DEVICE, 11)
    ref = reference_attention(query, k_cache, v_cache, qsl, lens, tables, 0.3, None)
    assert_close(paged_attention(query, k_cache, v_cache, qsl, lens, tables, 0.3), ref)


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
def test_merge_attention_states_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(7, 4, 64, generator=gen).to(DEVICE, dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(7, 4, generator=gen).to(DEVICE) * 3 for _ in range(2))
    lse_a[0, 0] = float("-inf")  # one empty side
    out, lse = merge_attention_states(a, lse_a, b, lse_b)
    ref_out, ref_lse = reference.merge_attention_states(a, lse_a, b, lse_b)
    assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # both sides empty: zero output and -inf, not NaN
    lse_a[1], lse_b[1] = float("-inf"), float("-inf")
    out, lse = merge_attention_states(a, lse_a, b, lse_b)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_split_heuristic_fills_the_gpu():
    cpu = torch.device("cpu")
    assert choose_num_splits(1, 8, 4096, cpu) > 8  # small batch, long context: many splits
    assert choose_num_splits(256, 8, 4096, cpu) == 1  # big batch fills the GPU alone
    assert choose_num_splits(1, 8, 64, cpu) == 1  # too short to split
    assert choose_num_splits(1, 1, 10**6, cpu) <= 64


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_decode_cuda_graph_replay_with_varying_seq_lens():
    """Capture paged_attention_decode once with a fixed bound; replay over new lengths/tables."""
    num_seqs, num_heads, num_kv, head_dim, block_size, bound = 8, 16, 8, 128, 16, 4096
    dtype = torch.bfloat16
    max_blocks = bound // block_size
    num_blocks = num_seqs * max_blocks + 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, device="cuda", dtype=dtype, generator=gen)
    # static graph inputs, filled in place before each replay
    query = torch.randn(num_seqs, num_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    seq_lens = torch.full((num_seqs,), bound, dtype=torch.int32, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda")[: num_seqs * max_blocks].view(num_seqs, max_blocks).int()
    out = torch.empty_like(query)

    def step():
        paged_attention_decode(query, k_cache, v_cache, seq_lens, tables, head_dim**-0.5, out=out, max_seq_len=bound)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for trial, lens in enumerate([[1, 2, 17, 100, 1000, 4096, 333, 64], [4096] * 8, [5, 0, 0, 0, 0, 0, 0, 7]]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        query.copy_(torch.randn(query.shape, device="cuda", dtype=dtype, generator=gen))
        tables.copy_(torch.randperm(num_blocks, device="cuda")[: num_seqs * max_blocks].view(num_seqs, max_blocks))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
        ref = reference_attention(query, k_cache, v_cache, qsl, seq_lens, tables, head_dim**-0.5, None)
        live = [i for i, n in enumerate(lens) if n > 0]
        assert not out.isnan().any(), f"trial {trial}: unwritten output"
        assert_close(out[live], ref[live])
