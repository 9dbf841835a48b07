"""Cascade attention: attention over a prefix of whole KV blocks, computed once for many query rows.

Why. Requests that share a prompt prefix (one system prompt through the prefix cache, the
n > 1 completions of one prompt) hold the same physical KV blocks, and the split-KV decode
kernel reads those blocks once per request: 64 requests sharing 2,048 tokens read them 64
times. Here the shared blocks are read once per KV head for the query rows of all the
requests that share them (a [rows x keys] tile product on tensor cores) and the result is
merged with each request's attention over its own remaining blocks by log-sum-exp, as
FlashInfer's cascade attention does. The same split serves a short prefill chunk with a long
cached context: the context is a prefix shared by every token of the chunk; the unified
kernel walks it in one program per query tile (a few programs for ~4,000 keys), here it is
spread over the GPU.

One attention call with a plan (layers/attention/cascade.py builds it on the host):

  1. base: `paged_attention` over the *suffix* block tables (each sequence's table without
     its shared blocks, its length shortened to match) writes every row's output and
     log-sum-exp. Positions shift by whole blocks, so causality is unchanged.
  2. `_shared_prefix_kernel`, grid (tile, KV head, split): a tile is up to
     `cascade_queries_per_tile(group)` queries that share `shared_len` keys (the first blocks
     of one block-table row); BLOCK_M rows = queries x the KV head's query heads. Each
     program attends its rows to one split of the shared keys and writes a partial output
     and log-sum-exp.
  3. `_cascade_merge_kernel`, grid (query slot, KV head): merges the splits of one query's
     heads (running max, as the decode kernel's split merge) and then that with the base
     result (`_merge_states`, the pairwise merge of paged_attention.py), in place.

CUDA graphs: nothing syncs with the host. The tile table is a tensor (a tile with 0 queries
is a no-op), `num_splits` is fixed by the caller, and each tile's split length is derived in
the kernel from its `shared_len`, so one capture serves any plan that fits its tile count.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch_math import (CASCADE_BLOCK_M, CASCADE_TILE_COLUMNS, cascade_queries_per_tile, cdiv,
                                         next_pow2)
from nanovllm.kernels.paged_attention import (LOG2E, _check_common, _dot_precision, _merge_states, _natural_lse,
                                              merge_splits_per_load, num_sms, paged_attention)
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl

TILE_COLUMNS = CASCADE_TILE_COLUMNS  # a tile: (queries, shared keys, block-table row of the shared blocks)
TILE_STRIDE = tl.constexpr(CASCADE_TILE_COLUMNS)  # the same, as the kernels see it

CASCADE_TILE_N = 64  # keys per inner iteration
CASCADE_NUM_WARPS = 4  # BLOCK_M 64 x TILE_N 64 x head_dim 128: the unified kernel's tuned shape
CASCADE_NUM_STAGES = 2
CASCADE_PROGRAMS_PER_SM = 1  # one wave: more splits only add partial traffic and merge work
CASCADE_MIN_KEYS_PER_SPLIT = 128  # a split shorter than two tiles costs more than it spreads
CASCADE_MAX_SPLITS = 32
MERGE_NUM_WARPS = 4


@triton.jit(do_not_specialize=["num_splits", "stride_bt_seq"])
def _shared_prefix_kernel(
    part_out_ptr,  # [num_tiles, num_kv_heads, num_splits, BLOCK_M, HEAD_DIM] fp32
    part_lse_ptr,  # [num_tiles, num_kv_heads, num_splits, BLOCK_M] fp32
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    tiles_ptr,  # [num_tiles, TILE_COLUMNS] int32
    query_rows_ptr,  # [num_tiles * QUERIES] int32: query row (token index) of each slot, -1 = empty
    num_kv_heads,
    num_splits,
    qk_scale,  # softmax scale * log2(e)
    stride_q_tok, stride_q_head,
    stride_k_blk, stride_k_head, stride_k_slot,
    stride_v_blk, stride_v_head, stride_v_slot,
    stride_bt_seq,
    GROUP: tl.constexpr,  # query heads per KV head
    QUERIES: tl.constexpr,  # query slots per tile
    BLOCK_M: tl.constexpr,  # rows per program >= QUERIES * GROUP, a power of two >= 16
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Before the PDL wait: only step inputs (tile table, query rows, block table), which no
    # kernel of the forward writes (kernels/pdl.py).
    num_queries = tl.load(tiles_ptr + tile * TILE_STRIDE)
    shared_len = tl.load(tiles_ptr + tile * TILE_STRIDE + 1)
    table_row = tl.load(tiles_ptr + tile * TILE_STRIDE + 2)
    keys_per_split = tl.cdiv(tl.cdiv(shared_len, num_splits), TILE_N) * TILE_N
    s_lo = split * keys_per_split
    s_hi = tl.minimum(s_lo + keys_per_split, shared_len)  # empty when s_lo >= shared_len
    offs_n = tl.arange(0, TILE_N)
    bt_row = block_tables_ptr + table_row.to(tl.int64) * stride_bt_seq
    blk = tl.load(bt_row + (s_lo + offs_n) // BLOCK_SIZE, mask=s_lo + offs_n < s_hi, other=0).to(tl.int64)
    # Row m = query slot m // GROUP, query head kv_head * GROUP + m % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    slot = offs_m // GROUP
    row_ok = (slot < QUERIES) & (slot < num_queries)
    q_tok = tl.load(query_rows_ptr + tile * QUERIES + slot, mask=row_ok, other=0).to(tl.int64)  # [BLOCK_M]
    pdl_wait(USE_PDL)  # q comes from the kernels before
    if num_queries == 0:  # a spare tile of a CUDA graph's upper bound
        return

    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
    q_off = q_tok * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    # Every shared key precedes every query of the tile: no causal mask, only the split's end.
    for start in range(s_lo, s_hi, TILE_N):
        k_pos = start + offs_n  # [TILE_N]
        k_ok = k_pos < s_hi
        kv_slot = k_pos % BLOCK_SIZE
        k = tl.load(k_base + (blk * stride_k_blk + kv_slot * stride_k_slot)[:, None] + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)  # [TILE_N, D]
        v = tl.load(v_base + (blk * stride_v_blk + kv_slot * stride_v_slot)[:, None] + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)  # [TILE_N, D]
        next_pos = k_pos + TILE_N  # the next tile's block ids, loaded while this tile computes
        blk = tl.load(bt_row + next_pos // BLOCK_SIZE, mask=next_pos < s_hi, other=0).to(tl.int64)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every iteration has >= 1 valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # [BLOCK_M, D]; 0 for an empty split
    part_row = ((tile * num_kv_heads + kv_head) * num_splits + split).to(tl.int64) * BLOCK_M + offs_m
    tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
    tl.store(part_lse_ptr + part_row, _natural_lse(m_i, l_i), mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _cascade_merge_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]: the base result in, the merged result out
    lse_ptr,  # [num_tokens, num_heads] fp32: the base result's log-sum-exp
    part_out_ptr,  # [num_tiles, num_kv_heads, num_splits, BLOCK_M, HEAD_DIM] fp32
    part_lse_ptr,  # [num_tiles, num_kv_heads, num_splits, BLOCK_M] fp32
    query_rows_ptr,  # [num_tiles * QUERIES] int32, -1 = empty slot
    num_heads,
    num_kv_heads,
    num_splits,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr,
    G: tl.constexpr,  # next_pow2(GROUP)
    QUERIES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MERGE_SPLITS: tl.constexpr,  # splits loaded per iteration (power of two)
    USE_PDL: tl.constexpr,
):
    slot_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    tok = tl.load(query_rows_ptr + slot_idx)
    pdl_wait(USE_PDL)  # the partials and the base result come from the two kernels before
    if tok < 0:
        return
    tile = slot_idx // QUERIES
    offs_g = tl.arange(0, G)
    offs_s = tl.arange(0, MERGE_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    head = kv_head * GROUP + offs_g  # [G]
    row_in_tile = (slot_idx % QUERIES) * GROUP + offs_g  # [G]
    first = (tile * num_kv_heads + kv_head).to(tl.int64) * num_splits * BLOCK_M  # split 0, row 0
    m = tl.full([G], float("-inf"), dtype=tl.float32)  # running max of the splits' lse
    l = tl.zeros([G], dtype=tl.float32)  # sum of exp(lse - m)
    acc = tl.zeros([G, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_SPLITS):
        ok = g_ok[:, None] & (s0 + offs_s < num_splits)[None, :]  # [G, S]
        rows = first + (s0 + offs_s[None, :]) * BLOCK_M + row_in_tile[:, None]  # [G, S]
        lse = tl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_out_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")  # [G, S, D]
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        w = tl.exp(lse - m_ref[:, None])  # [G, S], 0 for empty splits
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        l = l * alpha + tl.sum(w, 1)
        m = m_new
    has = l > 0.0
    o_shared = acc / tl.where(has, l, 1.0)[:, None]  # [G, D]
    lse_shared = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))

    o_rows = tok.to(tl.int64) * stride_o_tok + head * stride_o_head  # [G]
    o_base = tl.load(out_ptr + o_rows[:, None] + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    lse_base = tl.load(lse_ptr + tok.to(tl.int64) * num_heads + head, mask=g_ok, other=float("-inf"))
    o, _ = _merge_states(o_shared, lse_shared[:, None], o_base, lse_base[:, None])
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def choose_cascade_splits(num_tiles: int, num_kv_heads: int, max_shared_len: int, device: torch.device) -> int:
    """Key splits of the shared-prefix kernel: enough (tile, KV head, split) programs for
    CASCADE_PROGRAMS_PER_SM per SM, splits of at least CASCADE_MIN_KEYS_PER_SPLIT keys, at most
    CASCADE_MAX_SPLITS. Plain ints; a CUDA graph fixes it at capture from upper bounds."""
    target = CASCADE_PROGRAMS_PER_SM * num_sms(device)
    by_occupancy = cdiv(target, max(1, num_tiles * num_kv_heads))
    by_length = cdiv(max(1, max_shared_len), CASCADE_MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, CASCADE_MAX_SPLITS))


def _check_plan(query, k_cache, tiles, query_rows, queries_per_tile):
    group = query.shape[1] // k_cache.shape[1]
    if queries_per_tile < 1 or queries_per_tile * group > max(CASCADE_BLOCK_M, next_pow2(group)):
        raise ValueError(f"queries_per_tile={queries_per_tile} does not fit {CASCADE_BLOCK_M} rows at group {group}; "
                         f"use cascade_queries_per_tile(group) = {cascade_queries_per_tile(group)}")
    if tiles.dim() != 2 or tiles.shape[1] != TILE_COLUMNS or tiles.dtype != torch.int32 or not tiles.is_contiguous():
        raise ValueError(f"tiles must be a contiguous int32 [num_tiles, {TILE_COLUMNS}] tensor, got "
                         f"{tiles.dtype} {tuple(tiles.shape)}")
    if query_rows.shape != (tiles.shape[0] * queries_per_tile,) or query_rows.dtype != torch.int32:
        raise ValueError(f"query_rows must be int32 [num_tiles * queries_per_tile] = "
                         f"[{tiles.shape[0] * queries_per_tile}], got {query_rows.dtype} {tuple(query_rows.shape)}")


def shared_prefix_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32: tile t's shared blocks are row tiles[t, 2]'s first
    tiles: torch.Tensor,  # [num_tiles, 3] int32: (queries, shared keys, block-table row)
    query_rows: torch.Tensor,  # [num_tiles * queries_per_tile] int32, -1 = empty slot
    queries_per_tile: int,
    scale: float,
    num_splits: int,
    *,
    pdl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of each tile's query rows over its shared keys, one part per split.

    Returns (part_out [num_tiles, num_kv_heads, num_splits, BLOCK_M, head_dim] fp32 normalised,
    part_lse [num_tiles, num_kv_heads, num_splits, BLOCK_M] fp32, -inf for an empty split);
    only the rows of live query slots are written.
    """
    _check_common(query, k_cache, v_cache)
    _check_plan(query, k_cache, tiles, query_rows, queries_per_tile)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_m = max(16, next_pow2(queries_per_tile * group))
    num_tiles = tiles.shape[0]
    part_out = query.new_empty((num_tiles, num_kv_heads, num_splits, block_m, head_dim), dtype=torch.float32)
    part_lse = query.new_empty((num_tiles, num_kv_heads, num_splits, block_m), dtype=torch.float32)
    if num_tiles == 0:
        return part_out, part_lse
    pdl = use_pdl(query, pdl)
    _shared_prefix_kernel[(num_tiles, num_kv_heads, num_splits)](
        part_out, part_lse, query, k_cache, v_cache, block_tables, tiles, query_rows,
        num_kv_heads, num_splits, scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, QUERIES=queries_per_tile, BLOCK_M=block_m, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        TILE_N=CASCADE_TILE_N, DOT_PRECISION=_dot_precision(query.dtype), USE_PDL=pdl,
        num_warps=CASCADE_NUM_WARPS, num_stages=CASCADE_NUM_STAGES, **pdl_launch_options(pdl),
    )
    return part_out, part_lse


def merge_shared_prefix(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]: base result, merged in place
    lse: torch.Tensor,  # [num_tokens, num_heads] fp32 base log-sum-exp
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    query_rows: torch.Tensor,
    queries_per_tile: int,
    *,
    pdl: bool = True,
) -> torch.Tensor:
    """out[row] = log-sum-exp merge of the base result and the shared-prefix splits, for every live slot's row."""
    num_tiles, num_kv_heads, num_splits, block_m, head_dim = part_out.shape
    num_heads = out.shape[1]
    if lse.shape != out.shape[:2] or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 {tuple(out.shape[:2])} tensor, got {tuple(lse.shape)}")
    if num_tiles == 0:
        return out
    group = num_heads // num_kv_heads
    pdl = use_pdl(out, pdl)
    _cascade_merge_kernel[(num_tiles * queries_per_tile, num_kv_heads)](
        out, lse, part_out, part_lse, query_rows, num_heads, num_kv_heads, num_splits,
        out.stride(0), out.stride(1),
        GROUP=group, G=next_pow2(group), QUERIES=queries_per_tile, BLOCK_M=block_m, HEAD_DIM=head_dim,
        MERGE_SPLITS=merge_splits_per_load(num_splits, group, head_dim), USE_PDL=pdl,
        num_warps=MERGE_NUM_WARPS, **pdl_launch_options(pdl),
    )
    return out


def cascade_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32, the full tables (shared blocks first)
    suffix_block_tables: torch.Tensor,  # [num_seqs, width] int32: each table without its shared blocks
    suffix_seq_lens: torch.Tensor,  # [num_seqs] int32: seq_lens minus the shared keys
    tiles: torch.Tensor,  # [num_tiles, 3] int32
    query_rows: torch.Tensor,  # [num_tiles * queries_per_tile] int32
    queries_per_tile: int,
    scale: float,
    max_query_len: Optional[int],
    max_suffix_len: int,  # bound of suffix_seq_lens (decode split count)
    max_shared_len: int,  # bound of the tiles' shared keys (split count when num_splits is None)
    num_splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    *,
    pdl: bool = True,
) -> torch.Tensor:
    """`paged_attention` of the batch with the plan's shared prefixes read once per tile.

    Same result as `paged_attention(query, ..., seq_lens, block_tables)` when each tile's
    shared keys are whole blocks that every one of its queries sees (they precede the
    query's sequence position) and the suffix tables / lengths are the full ones without
    them. No sliding window (a windowed layer attends without a plan).
    """
    if out is None:
        out = torch.empty_like(query)
    if query.shape[0] == 0:
        return out
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)  # [num_tokens, num_heads]
    paged_attention(query, k_cache, v_cache, query_start_loc, suffix_seq_lens, suffix_block_tables, scale,
                    out=out, max_query_len=max_query_len, max_seq_len=max_suffix_len, pdl=pdl, lse_out=lse)
    if tiles.shape[0] == 0:
        return out
    if num_splits is None:
        num_splits = choose_cascade_splits(tiles.shape[0], k_cache.shape[1], max_shared_len, query.device)
    part_out, part_lse = shared_prefix_attention(query, k_cache, v_cache, block_tables, tiles, query_rows,
                                                 queries_per_tile, scale, num_splits, pdl=pdl)
    return merge_shared_prefix(out, lse, part_out, part_lse, query_rows, queries_per_tile, pdl=pdl)
