"""Triton paged attention: one kernel for mixed prefill/decode batches, a split-KV decode path.

Why two kernels. A mixed batch (prefill chunks over a cached prefix plus decode tokens) is
served by one "unified" kernel: one program per (query tile of one sequence, KV head), so
that every query head of a GQA group shares the K/V pages it loads, and a tile of query
rows turns QK^T and PV into tensor-core `tl.dot`s. A decode-only batch has one query row
per sequence, so that grid would leave the GPU idle at small batch and long context:
`paged_attention_decode` splits each sequence's keys over several programs
(flash-decoding), writes partial outputs plus their log-sum-exp, and the last program of
each (sequence, KV head) to finish merges the splits, found by an atomic counter: one
launch per layer, not a split kernel plus a reduce kernel (at batch 1 a launch costs about
as much as the reduce's work). That merge (`_merge_splits`) combines all splits of a KV
group at once with a running max; the pairwise log-sum-exp merge of two results
(`_merge_states`, for cascade attention) is exposed as `merge_attention_states`, the twin
of `reference.merge_attention_states`.

Batch description (see `reference.py`): the new tokens of all sequences are concatenated;
`query_start_loc[i]:query_start_loc[i+1]` are sequence i's tokens, `seq_lens[i]` is its
context length after this step, so its new tokens sit at positions
`seq_lens[i] - q_len_i .. seq_lens[i] - 1`. K/V are already stored in the paged cache
`[num_blocks, num_kv_heads, block_size, head_dim]`.

Nothing here syncs with the host: the unified kernel finds its sequence by a binary search
over `query_start_loc` inside the kernel, and the decode path reads the real `seq_lens`
from the tensor, so a CUDA graph captured with an upper bound (`max_seq_len`,
`num_splits`) stays right when the lengths change between replays.

Softmax runs in base 2 (`exp2`, scores pre-multiplied by log2(e)) with fp32 statistics and
an fp32 accumulator; log-sum-exp values that leave a kernel are natural logs. Both kernels
can also write each query row's log-sum-exp (`lse_out`), so that their result over part of
the keys merges with another part's (cascade attention, kernels/cascade_attention.py).

Soft-capping (Gemma 2: `cap * tanh(scale * q.k / cap)` before the softmax) and the sliding
window are per-layer settings: `USE_SOFTCAP` / `USE_WINDOW` are constexprs, so a layer
without them compiles to exactly the kernel it had before they existed.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch_math import cdiv, next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl

LOG2E = 1.4426950408889634  # log2(e): scores * scale * LOG2E feed exp2
TANH_SATURATION = tl.constexpr(40.0)  # exp(40) ~ 2e17: 1 - 2 / (e^x + 1) is 1.0 in fp32 well before

# Unified (prefill / mixed) kernel. BLOCK_M query rows = BLOCK_Q tokens x group heads.
# H100 sweep (benchmarks/kernels_bench.py --sweep, Qwen3-0.6B shapes): 64/64/4 warps/3 stages
# was best or within 5% of best for 1024- and 8192-token prompts; 128-row tiles lost 10-20%
# at 1024 tokens and won 5% at 8192.
PREFILL_BLOCK_M = 64  # query rows per program (tokens x heads of one KV group)
PREFILL_TILE_N = 64  # keys per inner iteration (several pages when block_size < 64)
PREFILL_NUM_WARPS = 4
PREFILL_NUM_STAGES = 3

# Split-KV decode kernel.
DECODE_MIN_ROWS = 16  # tl.dot needs >= 16 rows: the query heads of a group are padded to it
DECODE_TILE_N = 64  # keys per inner iteration
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_PROGRAMS_PER_SM = 2  # aim for this many (seq, kv head, split) programs per SM
DECODE_MIN_KEYS_PER_SPLIT = 256  # long contexts: a shorter split costs more than it saves
DECODE_SHORT_CONTEXT_SPLITS = 8  # short contexts: up to this many splits of >= one tile (latency)
DECODE_MAX_SPLITS = 64
DEFAULT_NUM_SMS = 132  # H100 SXM; used when no CUDA device is present (interpreter)

MERGE_NUM_WARPS = 1
MERGE_TILE_ELEMENTS = 4096  # fp32 partials the split merge holds at once (32 registers per thread at 4 warps)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (DEFAULT_NUM_SMS off CUDA)."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tests compare at 1e-4); bf16/fp16 ignore the flag.
    return "ieee" if dtype == torch.float32 else "tf32"


def _score_scales(scale: float, softcap: Optional[float]) -> tuple[float, float]:
    """(qk_scale, cap_log2) for the kernels: scores are `q.k * qk_scale` in base-2 units, or
    with soft-capping `cap_log2 * tanh(q.k * qk_scale)` (qk_scale = scale / cap)."""
    if softcap is None:
        return scale * LOG2E, 0.0
    if softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    return scale / softcap, softcap * LOG2E


@triton.jit
def _soft_cap(s, cap_log2):
    """cap * tanh(s) in base-2 units (s = scaled score / cap); tanh as 1 - 2 / (e^2s + 1),
    without a libdevice call; 2s is clamped where tanh is 1 in fp32 already (no inf)."""
    return cap_log2 * (1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * s, TANH_SATURATION)) + 1.0))


def _check_common(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "expected query [num_tokens, num_heads, head_dim] and k/v caches "
            f"[num_blocks, num_kv_heads, block_size, head_dim]; got {tuple(query.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if query.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the last (head_dim) dimension of query and caches must be contiguous")


def _check_lse_out(query: torch.Tensor, lse_out: Optional[torch.Tensor]) -> None:
    if lse_out is not None and (lse_out.shape != query.shape[:2] or lse_out.dtype != torch.float32
                                or not lse_out.is_contiguous()):
        raise ValueError(f"lse_out must be a contiguous fp32 [num_tokens, num_heads] = {tuple(query.shape[:2])} "
                         f"tensor, got {lse_out.dtype} {tuple(lse_out.shape)}")


@triton.jit
def _natural_lse(m_i, l_i):
    """Natural-log sum-exp of rows from their base-2 running max and sum (-inf: no keys)."""
    has_keys = l_i > 0.0
    return tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))


# ----------------------------------------------------------------------------- merge


@triton.jit
def _merge_states(o_a, lse_a, o_b, lse_b):
    """Merge two partial attention results over disjoint key sets.

    o_*: [..., HEAD_DIM] fp32 normalised outputs; lse_*: [...] natural-log sum-exp.
    An empty part has lse = -inf and contributes nothing (its output is never read, so
    garbage or NaN there is harmless); two empty parts give (0, -inf).
    """
    m = tl.maximum(lse_a, lse_b)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m)
    w_b = tl.exp(lse_b - m)
    total = w_a + w_b
    nonempty = total > 0.0
    safe_total = tl.where(nonempty, total, 1.0)
    o = tl.where(w_a > 0.0, o_a * (w_a / safe_total), 0.0) + tl.where(w_b > 0.0, o_b * (w_b / safe_total), 0.0)
    lse = tl.where(nonempty, m + tl.log(safe_total), float("-inf"))
    return o, lse


@triton.jit(do_not_specialize=["num_heads"])
def _merge_attention_states_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    lse_out_ptr,  # [num_tokens, num_heads] fp32
    a_ptr,
    lse_a_ptr,
    b_ptr,
    lse_b_ptr,
    num_heads,
    stride_o_tok, stride_o_head,
    stride_a_tok, stride_a_head,
    stride_b_tok, stride_b_head,
    stride_la_tok, stride_la_head,
    stride_lb_tok, stride_lb_head,
    HEAD_DIM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    o_a = tl.load(a_ptr + tok * stride_a_tok + head * stride_a_head + d).to(tl.float32)
    o_b = tl.load(b_ptr + tok * stride_b_tok + head * stride_b_head + d).to(tl.float32)
    lse_a = tl.load(lse_a_ptr + tok * stride_la_tok + head * stride_la_head).to(tl.float32)
    lse_b = tl.load(lse_b_ptr + tok * stride_lb_tok + head * stride_lb_head).to(tl.float32)
    o, lse = _merge_states(o_a, lse_a, o_b, lse_b)
    tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + d, o.to(out_ptr.dtype.element_ty))
    tl.store(lse_out_ptr + tok * num_heads + head, lse)


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] natural-log sum-exp of scores
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.merge_attention_states` (split-KV, cascade attention).

    Returns (merged output in out_a's dtype, merged lse in fp32). Parts with lse = -inf
    are empty; two empty parts merge to (0, -inf) instead of NaN.
    """
    num_tokens, num_heads, head_dim = out_a.shape
    if out_b.shape != out_a.shape or lse_a.shape != (num_tokens, num_heads) or lse_b.shape != lse_a.shape:
        raise ValueError("merge_attention_states: shapes of outputs / lse do not match")
    if head_dim & (head_dim - 1) or out_a.stride(2) != 1 or out_b.stride(2) != 1:
        raise ValueError("merge_attention_states: head_dim must be a contiguous power of two")
    if out is None:
        out = torch.empty_like(out_a)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=out_a.device)
    if num_tokens == 0:
        return out, lse
    _merge_attention_states_kernel[(num_tokens, num_heads)](
        out, lse, out_a, lse_a, out_b, lse_b, num_heads,
        out.stride(0), out.stride(1),
        out_a.stride(0), out_a.stride(1),
        out_b.stride(0), out_b.stride(1),
        lse_a.stride(0), lse_a.stride(1),
        lse_b.stride(0), lse_b.stride(1),
        HEAD_DIM=head_dim, num_warps=MERGE_NUM_WARPS,
    )
    return out, lse


# ----------------------------------------------------------------------------- unified kernel


@triton.jit
def _find_seq(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning global query tile `tile_idx`.

    Sequence i owns the tiles from `query_start_loc[i] // BLOCK_Q + i` on: that start is
    increasing in i and leaves every sequence at least ceil(q_len / BLOCK_Q) tiles, so a
    grid of `num_tokens // BLOCK_Q + num_seqs` tiles covers any batch with no host sync.
    Binary search for the last sequence whose first tile is <= tile_idx.
    """
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # [BLOCK_M, D] queries; running output / max / sum
    k_pos,  # [TILE_N] absolute key positions of this tile
    q_pos,  # [BLOCK_M] absolute query positions
    k_hi, window,
    bt_row, k_base, v_base,
    stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot,
    qk_scale, cap_log2,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the tile is visible to every row
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
):
    """One online-softmax step of BLOCK_M query rows over TILE_N paged keys (base-2 units)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        k_ok = k_pos < k_hi
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)  # [TILE_N]
    else:
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE).to(tl.int64)
    slot = k_pos % BLOCK_SIZE
    k_off = (blk * stride_k_blk + slot * stride_k_slot)[:, None] + offs_d[None, :]
    v_off = (blk * stride_v_blk + slot * stride_v_slot)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_base + k_off, mask=k_ok[:, None], other=0.0)  # [TILE_N, D]
    else:
        k = tl.load(k_base + k_off)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
    if USE_SOFTCAP:
        s = _soft_cap(s, cap_log2)
    if MASKED:
        allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_use[:, None])  # [BLOCK_M, TILE_N]
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + v_off, mask=k_ok[:, None], other=0.0)  # [TILE_N, D]
    else:
        v = tl.load(v_base + v_off)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs", "num_tiles", "window", "stride_bt_seq"])  # vary per step: no recompiles
def _unified_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    lse_ptr,  # [num_tokens, num_heads] fp32 natural-log sum-exp of each row (WRITE_LSE)
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    num_seqs,
    num_tiles,  # query tiles in the grid (upper bound, see _find_seq)
    num_kv_heads,
    qk_scale,  # softmax scale * log2(e); with USE_SOFTCAP scale / cap
    window,  # sliding window (keys), only read when USE_WINDOW
    cap_log2,  # soft-cap * log2(e), only read when USE_SOFTCAP
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_k_blk, stride_k_head, stride_k_slot,
    stride_v_blk, stride_v_head, stride_v_slot,
    stride_bt_seq,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per KV page
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program = BLOCK_Q tokens x GROUP heads (+ padding)
    BLOCK_Q: tl.constexpr,  # query tokens per program
    TILE_N: tl.constexpr,  # keys per iteration
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    WRITE_LSE: tl.constexpr = False,
):
    # Flat grid, KV head fastest and tiles in reverse: the last tiles of a sequence see the
    # most keys, so the longest programs start first and the short ones fill the tail.
    pid = tl.program_id(0)
    kv_head = pid % num_kv_heads
    tile_idx = num_tiles - 1 - pid // num_kv_heads

    seq = _find_seq(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile = tile_idx - (q_start // BLOCK_Q + seq)  # tile index inside the sequence
    if q_tile * BLOCK_Q >= q_len:  # spare tile of the grid's upper bound
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step

    # Row m of the tile = token m // GROUP, query head kv_head * GROUP + m % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = q_tile * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] token index inside the sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
    row_ok = (offs_m // GROUP < BLOCK_Q) & (tok < q_len)
    q_pos = context_len + tok  # [BLOCK_M] absolute position of each row's token

    q_rows = (q_start + tok).to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    offs_n = tl.arange(0, TILE_N)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head

    # Keys this tile can see: up to its last token; with a window, from its first token's window.
    first_q = context_len + q_tile * BLOCK_Q
    k_hi = tl.minimum(first_q + BLOCK_Q, seq_len)
    if USE_WINDOW:  # every tile masked (window on one side, causal on the other)
        k_lo = (tl.maximum(first_q - window + 1, 0) // TILE_N) * TILE_N
        for start in range(k_lo, k_hi, TILE_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, start + offs_n, q_pos, k_hi, window, bt_row, k_base, v_base,
                stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, qk_scale, cap_log2,
                BLOCK_SIZE, HEAD_DIM, True, USE_WINDOW, DOT_PRECISION, USE_SOFTCAP,
            )
    else:
        # Whole tiles before the first query are visible to every row: no masks there.
        k_full = (first_q // TILE_N) * TILE_N
        for start in range(0, k_full, TILE_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, start + offs_n, q_pos, k_hi, window, bt_row, k_base, v_base,
                stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, qk_scale, cap_log2,
                BLOCK_SIZE, HEAD_DIM, False, USE_WINDOW, DOT_PRECISION, USE_SOFTCAP,
            )
        for start in range(k_full, k_hi, TILE_N):  # the causal diagonal
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, start + offs_n, q_pos, k_hi, window, bt_row, k_base, v_base,
                stride_k_blk, stride_k_slot, stride_v_blk, stride_v_slot, qk_scale, cap_log2,
                BLOCK_SIZE, HEAD_DIM, True, USE_WINDOW, DOT_PRECISION, USE_SOFTCAP,
            )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_rows = (q_start + tok).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        lse_rows = (q_start + tok).to(tl.int64) * (num_kv_heads * GROUP) + head
        tl.store(lse_ptr + lse_rows, _natural_lse(m_i, l_i), mask=row_ok)


def _launch_unified(
    query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, out,
    block_m: int, tile_n: int, num_warps: int, num_stages: int, softcap: Optional[float] = None,
    lse_out: Optional[torch.Tensor] = None,
) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    block_m = max(block_m, next_pow2(group))
    block_q = block_m // group
    num_tiles = num_tokens // block_q + num_seqs  # upper bound, no host sync (see _find_seq)
    qk_scale, cap_log2 = _score_scales(scale, softcap)
    _unified_attention_kernel[(num_tiles * num_kv_heads,)](
        out, out if lse_out is None else lse_out, query, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
        num_seqs, num_tiles, num_kv_heads, qk_scale, sliding_window or 0, cap_log2,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
        USE_WINDOW=sliding_window is not None, DOT_PRECISION=_dot_precision(query.dtype),
        USE_SOFTCAP=softcap is not None, WRITE_LSE=lse_out is not None, num_warps=num_warps, num_stages=num_stages,
    )


def _unified_config(num_tokens: int, num_heads: int, num_kv_heads: int, device: torch.device):
    """(block_m, tile_n, num_warps, num_stages) of the unified kernel (one config: see the sweep note)."""
    return PREFILL_BLOCK_M, PREFILL_TILE_N, PREFILL_NUM_WARPS, PREFILL_NUM_STAGES


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
    sliding_window: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    max_query_len: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    *,
    pdl: bool = True,  # the decode kernel's programmatic dependent launch (kernels/pdl.py)
    softcap: Optional[float] = None,  # Gemma 2: scores -> softcap * tanh(scores / softcap)
    lse_out: Optional[torch.Tensor] = None,  # [num_tokens, num_heads] fp32: also write each row's log-sum-exp
) -> torch.Tensor:
    """Causal attention of the new tokens over their paged K/V; `reference.paged_attention` semantics.

    `max_query_len == 1` (decode-only batch, one token per sequence) goes to the split-KV
    `paged_attention_decode`; anything else (or None: unknown) to the unified kernel, which
    handles any mix of prefill chunks, cached prefixes and decode tokens. Never syncs.
    """
    _check_common(query, k_cache, v_cache)
    _check_lse_out(query, lse_out)
    if out is None:
        out = torch.empty_like(query)
    if query.shape[0] == 0:
        return out
    if max_query_len == 1:
        return paged_attention_decode(
            query, k_cache, v_cache, seq_lens, block_tables, scale,
            sliding_window=sliding_window, out=out, max_seq_len=max_seq_len, pdl=pdl, softcap=softcap,
            lse_out=lse_out,
        )
    block_m, tile_n, num_warps, num_stages = _unified_config(
        query.shape[0], query.shape[1], k_cache.shape[1], query.device
    )
    _launch_unified(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, out,
        block_m, tile_n, num_warps, num_stages, softcap, lse_out,
    )
    return out


# ----------------------------------------------------------------------------- split-KV decode


@triton.jit(do_not_specialize=["num_splits", "window", "stride_bt_seq"])  # block-table width varies per step
def _decode_split_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    lse_ptr,  # [num_seqs, num_heads] fp32 natural-log sum-exp of each row (WRITE_LSE)
    part_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] fp32 (not DIRECT)
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32 (not DIRECT)
    counter_ptr,  # [num_seqs, num_kv_heads] int32, all 0 on entry and on exit (not DIRECT)
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,
    seq_lens_ptr,  # [num_seqs]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    num_heads,
    num_kv_heads,
    num_splits,
    qk_scale,  # softmax scale * log2(e); with USE_SOFTCAP scale / cap
    window,
    cap_log2,  # soft-cap * log2(e), only read when USE_SOFTCAP
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_k_blk, stride_k_head, stride_k_slot,
    stride_v_blk, stride_v_head, stride_v_slot,
    stride_bt_seq,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # max(16, next_pow2(GROUP)) rows so tl.dot applies
    GROUP_P2: tl.constexpr,  # next_pow2(GROUP): the merge's rows
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: write the normalised output, no merge
    MERGE_SPLITS: tl.constexpr,  # splits the merge loads per iteration (power of two)
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
    USE_SOFTCAP: tl.constexpr,
    WRITE_LSE: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Before the PDL wait: the split's bounds and its first tile's block ids. seq_lens and
    # block_tables are step inputs, written before the forward's first kernel and by no kernel
    # of the forward (see kernels/pdl.py), so two dependent loads leave the critical path.
    # The real length comes from the tensor: a graph captured with a larger bound still works.
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = 0
    if USE_WINDOW:  # the one query sits at seq_len - 1 and sees keys >= seq_len - window
        kv_lo = tl.maximum(seq_len - window, 0)
    keys_per_split = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), TILE_N) * TILE_N
    s_lo = kv_lo + split * keys_per_split
    s_hi = tl.minimum(s_lo + keys_per_split, seq_len)  # empty when s_lo >= seq_len
    offs_n = tl.arange(0, TILE_N)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    blk = tl.load(bt_row + (s_lo + offs_n) // BLOCK_SIZE, mask=s_lo + offs_n < s_hi, other=0).to(tl.int64)
    pdl_wait(USE_PDL)  # q and the new token's K/V come from the kernel before

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_g < GROUP
    head = kv_head * GROUP + offs_g  # [GROUP_PAD]
    q_rows = seq.to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    for start in range(s_lo, s_hi, TILE_N):
        k_pos = start + offs_n  # [TILE_N]
        k_ok = k_pos < s_hi
        slot = k_pos % BLOCK_SIZE
        k = tl.load(
            k_base + (blk * stride_k_blk + slot * stride_k_slot)[:, None] + offs_d[None, :],
            mask=k_ok[:, None], other=0.0,
        )  # [TILE_N, D]
        v = tl.load(
            v_base + (blk * stride_v_blk + slot * stride_v_slot)[:, None] + offs_d[None, :],
            mask=k_ok[:, None], other=0.0,
        )  # [TILE_N, D]
        next_pos = k_pos + TILE_N  # the next tile's block ids, loaded while this tile computes
        blk = tl.load(bt_row + next_pos // BLOCK_SIZE, mask=next_pos < s_hi, other=0).to(tl.int64)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE_N]
        if USE_SOFTCAP:
            s = _soft_cap(s, cap_log2)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every iteration has >= 1 valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # [GROUP_PAD, D]; 0 for an empty split
    if DIRECT:
        o_rows = seq.to(tl.int64) * stride_o_tok + head * stride_o_head
        tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if WRITE_LSE:
            tl.store(lse_ptr + seq.to(tl.int64) * num_heads + head, _natural_lse(m_i, l_i), mask=row_ok)
    else:
        # natural-log LSE of the split = (max + log2(sum)) * ln(2), -inf when the split is empty
        lse_2 = m_i + tl.log2(tl.where(has_keys, l_i, 1.0))
        lse = tl.where(has_keys, lse_2 * 0.6931471805599453, float("-inf"))
        part_row = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [GROUP_PAD]
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)
        # The last split of this (seq, kv head) to arrive merges them all. The barrier puts
        # every thread's partial stores before the counter update, whose release / acquire
        # (GPU scope) makes them visible to the program that sees the final count.
        tl.debug_barrier()
        counter = counter_ptr + seq * num_kv_heads + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.store(counter, 0)  # zero again for the next launch (graph replays reuse the buffer)
            _merge_splits(out_ptr, part_out_ptr, part_lse_ptr, seq, kv_head, num_heads, num_splits,
                          stride_o_tok, stride_o_head, GROUP, GROUP_P2, HEAD_DIM, MERGE_SPLITS,
                          lse_ptr, WRITE_LSE)


@triton.jit
def _merge_splits(out_ptr, part_out_ptr, part_lse_ptr, seq, kv_head, num_heads, num_splits, stride_o_tok,
                  stride_o_head, GROUP: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MERGE_SPLITS: tl.constexpr, lse_ptr, WRITE_LSE: tl.constexpr):
    """out[seq, heads of the KV group] = log-sum-exp merge of their num_splits partials.

    MERGE_SPLITS splits are loaded per iteration as one [GROUP, MERGE_SPLITS, D] tile (one
    memory round trip, not one per split), merged with a running max. The partials were
    written by other programs: they are read from L2 (`.cg`), never from this SM's L1.
    Empty splits (lse = -inf) get weight 0; a row with no keys at all gets 0.
    """
    offs_g = tl.arange(0, G)  # G = next_pow2(GROUP)
    offs_s = tl.arange(0, MERGE_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    head = kv_head * GROUP + offs_g  # [G]
    first = (seq.to(tl.int64) * num_heads + head) * num_splits  # [G] row of split 0
    m = tl.full([G], float("-inf"), dtype=tl.float32)  # running max of the splits' lse
    l = tl.zeros([G], dtype=tl.float32)  # sum of exp(lse - m)
    acc = tl.zeros([G, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, MERGE_SPLITS):
        ok = g_ok[:, None] & (s0 + offs_s < num_splits)[None, :]  # [G, S]
        rows = first[:, None] + s0 + offs_s[None, :]  # [G, S]
        lse = tl.load(part_lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_out_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")  # [G, S, D]
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: any finite reference
        alpha = tl.exp(m - m_ref)  # 0 while m is -inf
        w = tl.exp(lse - m_ref[:, None])  # [G, S], 0 for empty splits
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        l = l * alpha + tl.sum(w, 1)
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    o_rows = seq.to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    if WRITE_LSE:  # the splits' lse are natural logs: the merged one is m + ln(l)
        lse = tl.where(l > 0.0, m + tl.log(tl.where(l > 0.0, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq.to(tl.int64) * num_heads + head, lse, mask=g_ok)


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device, tile_n: int = DECODE_TILE_N
) -> int:
    """KV splits per sequence so that (seqs x kv heads x splits) programs fill the GPU.

    Host-side and sync-free (plain ints). Enough programs for DECODE_PROGRAMS_PER_SM per SM
    (a batch that fills the GPU on its own gets one split: no merge); splits of at
    least DECODE_MIN_KEYS_PER_SPLIT keys, except that short contexts may still use up to
    DECODE_SHORT_CONTEXT_SPLITS splits of one tile each (there latency, not bandwidth, rules);
    at most DECODE_MAX_SPLITS. Tuned on H100 for Qwen3-0.6B shapes (benchmarks/kernels_bench.py
    --sweep): batch 1 picks 8 / 8 / 16 splits at 512 / 1024 / 4096 tokens, batch >= 64 one.
    """
    target_programs = DECODE_PROGRAMS_PER_SM * num_sms(device)
    base = max(1, num_seqs * num_kv_heads)
    by_occupancy = cdiv(target_programs, base)
    max_seq_len = max(1, max_seq_len)
    by_length = max(
        cdiv(max_seq_len, DECODE_MIN_KEYS_PER_SPLIT),
        min(DECODE_SHORT_CONTEXT_SPLITS, cdiv(max_seq_len, tile_n)),
    )
    return max(1, min(by_occupancy, by_length, DECODE_MAX_SPLITS))


def _launch_decode(
    query, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window, out,
    num_splits: int, tile_n: int, num_warps: int, num_stages: int, pdl: bool = True,
    softcap: Optional[float] = None,
    lse_out: Optional[torch.Tensor] = None,
) -> None:
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    direct = num_splits == 1
    pdl = use_pdl(query, pdl)
    if direct:
        part_out = part_lse = counters = out  # unused placeholders
    else:
        part_out = query.new_empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32)
        part_lse = query.new_empty((num_seqs, num_heads, num_splits), dtype=torch.float32)
        counters = split_counters(query.device, num_seqs * num_kv_heads)
    qk_scale, cap_log2 = _score_scales(scale, softcap)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, out if lse_out is None else lse_out, part_out, part_lse, counters, query, k_cache, v_cache, seq_lens, block_tables,
        num_heads, num_kv_heads, num_splits, qk_scale, sliding_window or 0, cap_log2,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(DECODE_MIN_ROWS, next_pow2(group)), GROUP_P2=next_pow2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, TILE_N=tile_n,
        USE_WINDOW=sliding_window is not None, DIRECT=direct,
        MERGE_SPLITS=merge_splits_per_load(num_splits, group, head_dim),
        DOT_PRECISION=_dot_precision(query.dtype),
        num_warps=num_warps, num_stages=num_stages, USE_PDL=pdl, USE_SOFTCAP=softcap is not None,
        WRITE_LSE=lse_out is not None,
        **pdl_launch_options(pdl),
    )


def merge_splits_per_load(num_splits: int, group: int, head_dim: int) -> int:
    """Splits merged per load in `_merge_splits`: all of them when the [group, splits, D]
    fp32 tile stays within MERGE_TILE_ELEMENTS (registers), else a power-of-two share."""
    fit = max(1, MERGE_TILE_ELEMENTS // (next_pow2(group) * head_dim))
    return min(next_pow2(num_splits), 1 << (fit.bit_length() - 1))


# Arrival counters of the split merge, per device. Kernels leave them at zero, so one buffer
# serves every launch on the device's stream. A grown buffer never replaces the old one in
# memory: CUDA graphs captured with the old address keep using it.
_split_counter_buffers: dict = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least n counters on `device` for `_decode_split_kernel`."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    bufs = _split_counter_buffers.setdefault((device.type, index), [])  # "cuda" and "cuda:0": one buffer
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 2 * bufs[-1].numel() if bufs else n), dtype=torch.int32, device=device))
    return bufs[-1]


def paged_attention_decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length incl. the new token
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
    sliding_window: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    max_seq_len: Optional[int] = None,
    num_splits: Optional[int] = None,
    *,
    pdl: bool = True,
    softcap: Optional[float] = None,  # Gemma 2: scores -> softcap * tanh(scores / softcap)
    lse_out: Optional[torch.Tensor] = None,  # [num_seqs, num_heads] fp32: also write each row's log-sum-exp
) -> torch.Tensor:
    """Split-KV (flash-decoding) attention for a decode-only batch; CUDA-graph safe.

    `max_seq_len` is only an upper bound used to choose the split count (None: the block
    table's capacity, `max_blocks_per_seq * block_size`); the kernels read the real lengths
    from `seq_lens`, and splits past a sequence's end are empty (lse = -inf) and drop out
    of the merge. Pass a fixed `num_splits`/`max_seq_len` when capturing a graph.
    A sequence with seq_len 0 (batch padding) gets a zero output.
    """
    _check_common(query, k_cache, v_cache)
    _check_lse_out(query, lse_out)
    num_seqs = query.shape[0]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"decode expects one query token per sequence: {num_seqs} tokens, {seq_lens.shape[0]} seqs")
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_seq_len = min(max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    _launch_decode(
        query, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window, out,
        num_splits, DECODE_TILE_N, DECODE_NUM_WARPS, DECODE_NUM_STAGES, pdl, softcap, lse_out,
    )
    return out
