"""Cascade attention kernels vs the references (kernels/cascade_attention.py, kernels/reference.py).

- the `lse_out` of both paged-attention kernels vs `reference.paged_attention_lse`;
- the shared-prefix kernel (all splits merged, no base part) vs `reference.shared_prefix_attention`;
- the whole pipeline (suffix attention + shared prefix + merge) vs plain `reference.paged_attention`
  on the full block tables: decode batches with 0, 1 and 2 shared prefixes, a prefill chunk
  whose cached context is split off, spare tiles and empty splits;
- GPU: bf16 at Qwen3-0.6B shapes (64 requests sharing 2,048 tokens) and a CUDA graph captured
  once with a tile capacity, replayed over different plans.

CPU: the Triton interpreter in fp32 at small shapes (conftest.py sets TRITON_INTERPRET).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.cascade_attention import (TILE_COLUMNS, cascade_attention, choose_cascade_splits,
                                                merge_shared_prefix, shared_prefix_attention)
from nanovllm.kernels.launch_math import CASCADE_BLOCK_M, cascade_queries_per_tile
from nanovllm.kernels.paged_attention import paged_attention, paged_attention_decode

from kernel_params import DEVICE, GPU, HAS_CUDA, PRECISIONS, large_shapes

FP32_ATOL = 1e-4
LOW_PRECISION_REL = 2e-2
LSE_ATOL_16BIT = 1e-2


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "NaN in output (unwritten element?)"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref.float(), atol=FP32_ATOL, rtol=FP32_ATOL)
    else:
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < LOW_PRECISION_REL, f"relative error {err:.3e}"


def make_shared_batch(q_lens, seq_lens, shared_blocks, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """A varlen batch whose sequences share leading blocks: `shared_blocks[i] = (j, n)` makes
    sequence i's first n table entries those of sequence j (same physical blocks); None = own."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 5
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    # unused entries point at random valid blocks: reading past a sequence's end would show
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = perm[used : used + nb]
        used += nb
        if shared_blocks[i] is not None:
            j, n = shared_blocks[i]
            tables[i, :n] = tables[j, :n]
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    to = dict(device=DEVICE)
    return (query.to(dtype=dtype, **to), k_cache.to(dtype=dtype, **to), v_cache.to(dtype=dtype, **to), qsl.to(**to),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), tables.to(**to))


def make_plan(qsl, seq_lens, tables, prefixes, block_size, queries_per_tile, spare_tiles=0):
    """Suffix tables / lengths and the tile table for `prefixes`: [(sequences, shared blocks)].

    Every new token of the listed sequences becomes a query of the prefix's tiles (decode
    rows of several sequences, or one prefill chunk's tokens); the shared blocks are the
    first sequence's. `spare_tiles` empty tiles are appended (a CUDA graph's upper bound).
    """
    qsl_l, lens = qsl.tolist(), seq_lens.tolist()
    shift = [0] * len(lens)
    tiles, rows = [], []
    for seqs, nblocks in prefixes:
        queries = [t for i in seqs for t in range(qsl_l[i], qsl_l[i + 1])]
        for i in seqs:
            shift[i] = nblocks
        for c in range(0, len(queries), queries_per_tile):
            chunk = queries[c : c + queries_per_tile]
            tiles.append([len(chunk), nblocks * block_size, seqs[0]])
            rows += chunk + [-1] * (queries_per_tile - len(chunk))
    tiles += [[0, 0, 0]] * spare_tiles
    rows += [-1] * (spare_tiles * queries_per_tile)
    width = tables.shape[1]
    idx = torch.clamp(torch.arange(width, device=tables.device)[None, :] + torch.tensor(shift, device=tables.device)[:, None],
                      max=width - 1)
    suffix = torch.gather(tables, 1, idx.long()).contiguous()
    suffix_lens = seq_lens - torch.tensor(shift, dtype=torch.int32, device=seq_lens.device) * block_size
    return (suffix, suffix_lens, torch.tensor(tiles, dtype=torch.int32, device=DEVICE).view(-1, TILE_COLUMNS),
            torch.tensor(rows, dtype=torch.int32, device=DEVICE), max(s for s in suffix_lens.tolist()),
            max([n * block_size for _, n in prefixes], default=0))


def ref_attention(query, k_cache, v_cache, qsl, seq_lens, tables, scale):
    return reference.paged_attention(query.float(), k_cache.float(), v_cache.float(), qsl, seq_lens, tables, scale)


# ----------------------------------------------------------------------------- lse_out of paged attention

LSE_MIXES = {  # (q_lens, seq_lens)
    "decode": ([1, 1, 1, 1], [1, 16, 33, 130]),
    "mixed": ([30, 1, 1, 9], [30, 1, 17, 50]),
}


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mix", list(LSE_MIXES))
def test_lse_out_matches_reference(mix, num_splits, dtype):
    """Both kernels (decode: direct and split-merged) write the rows' natural-log sum-exp."""
    q_lens, seq_lens = LSE_MIXES[mix]
    query, k_cache, v_cache, qsl, lens, tables = make_shared_batch(
        q_lens, seq_lens, [None] * len(q_lens), 8, 2, 64, 16, dtype, seed=zlib.crc32(f"{mix}{num_splits}".encode()))
    scale = 0.125
    ref = reference.paged_attention_lse(query.float(), k_cache.float(), v_cache.float(), qsl, lens, tables, scale)
    lse = torch.full(query.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)
    if mix == "decode":
        out = paged_attention_decode(query, k_cache, v_cache, lens, tables, scale, num_splits=num_splits, lse_out=lse)
    else:
        out = paged_attention(query, k_cache, v_cache, qsl, lens, tables, scale, max_query_len=max(q_lens),
                              lse_out=lse)
    assert_close(out, ref_attention(query, k_cache, v_cache, qsl, lens, tables, scale))
    tol = FP32_ATOL if dtype == torch.float32 else LSE_ATOL_16BIT
    torch.testing.assert_close(lse, ref, atol=tol, rtol=tol)


def test_lse_out_is_checked():
    query, k_cache, v_cache, qsl, lens, tables = make_shared_batch([1], [5], [None], 4, 2, 32, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="lse_out"):
        paged_attention(query, k_cache, v_cache, qsl, lens, tables, 0.1, lse_out=torch.empty(1, 3))


# ----------------------------------------------------------------------------- the shared-prefix kernel

@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("num_splits", [1, 5])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 32, 16), (2, 64, 16), (3, 32, 32), (4, 64, 32), (8, 32, 16)])
def test_shared_prefix_kernel_matches_reference(group, head_dim, block_size, num_splits, dtype):
    """Tiles of several prefixes (one fuller than a tile, one short enough to leave empty
    splits), a spare tile; every split merged, no base part (its lse = -inf)."""
    num_kv_heads = 2
    qpt = cascade_queries_per_tile(group)
    large = large_shapes(dtype)
    n_a = qpt + 3 if not large else 3 * qpt + 1  # more queries than one tile holds
    shared_a, shared_b = (5 if not large else 128), 1  # blocks; prefix b: shorter than a split when splits > 1
    seq_lens = [shared_a * block_size + 1 + i for i in range(n_a)] + [shared_b * block_size + 7] * 2
    owners = [None] + [(0, shared_a)] * (n_a - 1) + [None, (n_a, shared_b)]
    query, k_cache, v_cache, qsl, lens, tables = make_shared_batch(
        [1] * len(seq_lens), seq_lens, owners, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype,
        seed=zlib.crc32(f"{group}{head_dim}{block_size}{num_splits}{dtype}".encode()))
    prefixes = [(list(range(n_a)), shared_a), ([n_a, n_a + 1], shared_b)]
    _, _, tiles, rows, _, _ = make_plan(qsl, lens, tables, prefixes, block_size, qpt, spare_tiles=1)
    scale = head_dim**-0.5
    part_out, part_lse = shared_prefix_attention(query, k_cache, v_cache, tables, tiles, rows, qpt, scale, num_splits)
    assert part_out.shape[:3] == (tiles.shape[0], num_kv_heads, num_splits)
    out = torch.full_like(query, float("nan"))
    no_base = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=DEVICE)
    merge_shared_prefix(out, no_base, part_out, part_lse, rows, qpt)
    for seqs, nblocks in prefixes:
        r = torch.tensor(seqs, device=DEVICE)
        ref_out, _ = reference.shared_prefix_attention(query, k_cache.float(), v_cache.float(), r, tables[seqs[0]],
                                                       nblocks * block_size, scale)
        assert_close(out[r], ref_out)
    # partial lse of a live row merged over the splits = the reference lse of the prefix
    r = torch.tensor(prefixes[0][0][:1], device=DEVICE)
    _, ref_lse = reference.shared_prefix_attention(query, k_cache.float(), v_cache.float(), r, tables[0],
                                                   shared_a * block_size, scale)
    tol = FP32_ATOL if dtype == torch.float32 else LSE_ATOL_16BIT
    torch.testing.assert_close(torch.logsumexp(part_lse[0, :, :, :group].transpose(0, 1).reshape(num_splits, -1), 0),
                               ref_lse.view(-1), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- the whole pipeline

SMALL_CASES = {  # (q_lens, seq_lens, owners, prefixes) at block_size 16
    "no-prefix": ([1, 1, 1], [20, 40, 7], [None, None, None], []),
    "one-prefix": ([1] * 4, [70, 50, 90, 33], [None, (0, 2), (0, 2), None], [([0, 1, 2], 2)]),
    # prefix b ends mid-block in the prompt: only its 3 whole blocks are shared
    "two-prefixes": ([1] * 6, [70, 50, 90, 60, 61, 75], [None, (0, 3), (0, 3), None, (3, 3), (3, 3)],
                     [([0, 1, 2], 3), ([3, 4, 5], 3)]),
    # a prefill chunk of 9 tokens whose 96-token context (6 blocks) is split off, next to a decode prefix
    "chunk-context": ([9, 1, 1, 1], [105, 40, 41, 12], [None, None, (1, 2), None], [([0], 6), ([1, 2], 2)]),
}


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("case", list(SMALL_CASES))
@pytest.mark.parametrize("group", [1, 2, 4])
def test_cascade_attention_equals_paged_attention(case, group, dtype):
    q_lens, seq_lens, owners, prefixes = SMALL_CASES[case]
    block_size, head_dim, num_kv_heads = 16, 64, 2
    query, k_cache, v_cache, qsl, lens, tables = make_shared_batch(
        q_lens, seq_lens, owners, num_kv_heads * group, num_kv_heads, head_dim, block_size, dtype,
        seed=zlib.crc32(f"{case}{group}".encode()))
    qpt = cascade_queries_per_tile(group)
    suffix, suffix_lens, tiles, rows, max_suffix, max_shared = make_plan(qsl, lens, tables, prefixes, block_size, qpt,
                                                                        spare_tiles=1)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    cascade_attention(query, k_cache, v_cache, qsl, tables, suffix, suffix_lens, tiles, rows, qpt, scale,
                      max_query_len=max(q_lens), max_suffix_len=max_suffix, max_shared_len=max_shared, out=out)
    assert_close(out, ref_attention(query, k_cache, v_cache, qsl, lens, tables, scale))


def test_split_count_fills_the_gpu_and_respects_bounds():
    cpu = torch.device("cpu")
    assert choose_cascade_splits(2, 8, 2048, cpu) >= 8  # 16 (tile, head) pairs on 132 SMs: split the keys
    assert choose_cascade_splits(64, 8, 2048, cpu) == 1  # enough tiles already
    assert choose_cascade_splits(1, 1, 64, cpu) == 1  # too short to split
    assert choose_cascade_splits(1, 1, 10**6, cpu) <= 32
    assert cascade_queries_per_tile(2) * 2 == CASCADE_BLOCK_M and cascade_queries_per_tile(3) * 4 == CASCADE_BLOCK_M


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("private", [64, 1])
def test_qwen3_shape_shared_system_prompt_bf16(private):
    """64 decodes sharing a 2,048-token prefix (Qwen3-0.6B heads), each with its own tail."""
    n, block_size, shared_blocks = 64, 16, 128
    seq_lens = [shared_blocks * block_size + private + 3 * i for i in range(n)]
    owners = [None] + [(0, shared_blocks)] * (n - 1)
    query, k_cache, v_cache, qsl, lens, tables = make_shared_batch(
        [1] * n, seq_lens, owners, 16, 8, 128, block_size, torch.bfloat16, seed=7)
    qpt = cascade_queries_per_tile(2)
    suffix, suffix_lens, tiles, rows, max_suffix, max_shared = make_plan(qsl, lens, tables, [(list(range(n)), 128)],
                                                                        block_size, qpt)
    out = cascade_attention(query, k_cache, v_cache, qsl, tables, suffix, suffix_lens, tiles, rows, qpt, 128**-0.5,
                            max_query_len=1, max_suffix_len=max_suffix, max_shared_len=max_shared)
    assert_close(out, ref_attention(query, k_cache, v_cache, qsl, lens, tables, 128**-0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cascade_cuda_graph_replays_over_different_plans():
    """Captured once with fixed num_splits and a tile capacity of 4; replayed with two
    prefixes, one, and none (spare tiles have 0 queries), lengths and tables changing."""
    n, block_size, num_kv, group, head_dim = 24, 16, 8, 2, 128
    qpt = cascade_queries_per_tile(group)
    capacity, width = 4, 160
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = n * width
    k_cache = torch.randn(num_blocks, num_kv, block_size, head_dim, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(n, num_kv * group, head_dim, device="cuda", dtype=dtype, generator=gen)
    qsl = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    tables = torch.zeros(n, width, dtype=torch.int32, device="cuda")
    suffix = torch.zeros_like(tables)
    suffix_lens = torch.ones(n, dtype=torch.int32, device="cuda")
    tiles = torch.zeros(capacity, TILE_COLUMNS, dtype=torch.int32, device="cuda")
    rows = torch.full((capacity * qpt,), -1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    bound = width * block_size

    def step():
        cascade_attention(query, k_cache, v_cache, qsl, tables, suffix, suffix_lens, tiles, rows, qpt, 0.09,
                          max_query_len=1, max_suffix_len=bound, max_shared_len=bound, num_splits=6, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    plans = [[(list(range(0, 10)), 100), (list(range(12, 20)), 30)], [(list(range(n)), 64)], []]
    for trial, prefixes in enumerate(plans):
        lens_l = [1700 + 37 * i % 300 for i in range(n)]  # longer than every shared prefix (1,600 tokens)
        owners = [None] * n
        for seqs, nb in prefixes:
            for i in seqs[1:]:
                owners[i] = (seqs[0], nb)
        q2, k2, v2, _, lens2, tables2 = make_shared_batch([1] * n, lens_l, owners, num_kv * group, num_kv, head_dim,
                                                          block_size, dtype, seed=trial)
        k_cache[: k2.shape[0]].copy_(k2)
        v_cache[: v2.shape[0]].copy_(v2)
        query.copy_(q2)
        tables.zero_()
        tables[:, : tables2.shape[1]].copy_(tables2)
        s, sl, t, r, _, _ = make_plan(qsl, lens2, tables, prefixes, block_size, qpt)
        suffix.copy_(s)
        suffix_lens.copy_(sl)
        tiles.zero_()
        rows.fill_(-1)
        tiles[: t.shape[0]].copy_(t)
        rows[: r.shape[0]].copy_(r)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_attention(query, k_cache, v_cache, qsl, lens2, tables, 0.09)
        assert_close(out, ref)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16", marks=GPU)])
def test_chunk_context_split_at_gpu_shape(dtype):
    """A 128-token prefill chunk over a 3,968-token cached context next to 32 decodes: the
    context goes to the shared-prefix kernel, the rest to the unified kernel."""
    block_size, chunk, context = 16, 128, 3968
    q_lens = [chunk] + [1] * 32
    seq_lens = [context + chunk] + [1024 + 5 * i for i in range(32)]
    query, k_cache, v_cache, qsl, lens, tables = make_shared_batch(
        q_lens, seq_lens, [None] * 33, 16, 8, 128, block_size, dtype, seed=3)
    qpt = cascade_queries_per_tile(2)
    suffix, suffix_lens, tiles, rows, max_suffix, max_shared = make_plan(qsl, lens, tables,
                                                                        [([0], context // block_size)], block_size, qpt)
    out = cascade_attention(query, k_cache, v_cache, qsl, tables, suffix, suffix_lens, tiles, rows, qpt, 128**-0.5,
                            max_query_len=chunk, max_suffix_len=max_suffix, max_shared_len=max_shared)
    assert_close(out, ref_attention(query, k_cache, v_cache, qsl, lens, tables, 128**-0.5))
