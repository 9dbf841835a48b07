"""Triton [q/k RMSNorm +] RoPE + KV-cache store, fused: one launch per layer instead of three (five).

Why. After the qkv projection every layer rotates q and k and writes k and v into the
paged cache. Done separately that is three small kernels and three round trips of q/k
through memory; at decode batch sizes each launch costs more than its work. Here one
program handles one token: it reads the token's cos/sin once, rotates all of its query
and key heads in place, and writes the rotated key and the value into the token's cache
slot (`slot_mapping[t]`, -1 = padding: rotate, but store nothing).

Qwen3 normalises every q and k head (RMSNorm over head_dim, weights `q_norm` / `k_norm`)
between the projection and RoPE. Given `q_norm_weight` / `k_norm_weight`, the same program
does that first: it already holds the whole head (the two rotary halves plus, for partial
rotary, the unrotated tail, each loaded once), so the norm costs no extra traffic and
saves the two RMSNorm launches per layer (56 per Qwen3-0.6B decode step). Numerics are
`reference.rms_norm` then RoPE: sum of squares and scaling in fp32, the normalised head
rounded to the input dtype, multiplied by the weight and rounded again, then rotated.

RoPE is rotate-half (NeoX / HF Llama) on the first `rotary_dim` features of each head,
with `cos_sin_cache [max_positions, rotary_dim] = cat(cos, sin)` as in `reference.py`;
`rotary_dim < head_dim` (partial rotary) leaves the other features unrotated (only
normalised, when a norm is given). Math in fp32, results cast back to the input dtype (then
to the cache dtype), matching the reference.

q and k may be strided views (e.g. slices of the fused qkv output) as long as their last
dimension is contiguous; they are normalised / rotated in place and returned.

An fp8 cache (`kv_quant.py`) gets `round_e4m3(clamp(x * inv_scale, +-448))` per KV head, the
reciprocal scales read from the layer's `kv_scale [4, num_kv_heads]`. For a fully rotary head
the keys are stored rotated by a normalised Hadamard matrix H and q is rewritten as H q, so
that q.k is unchanged and no channel of k dominates the rounding error (kv_quant.py): one
butterfly of the two rotary halves and a half-size H on tensor cores. The rounding is done
in fp32 by `_round_e4m3` (exact integer arithmetic, ties to even) before the conversion, so
the conversion itself is exact: the GPU's saturating conversion and the CPU interpreter's
(which mis-rounds values that carry into the next binade) then store the same bits as torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nanovllm.kernels import kv_quant
from nanovllm.kernels.launch_math import next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl

SMALL_TILE = 2048  # elements (heads x features) per tile up to which 4 warps suffice
HADAMARD_MIN_ROWS = 16  # tl.dot operands have at least 16 rows
NUM_WARPS_SMALL = 4
NUM_WARPS_LARGE = 8


def _num_warps(elements: int) -> int:
    return NUM_WARPS_SMALL if elements <= SMALL_TILE else NUM_WARPS_LARGE


FP8_MAX = tl.constexpr(kv_quant.FP8_E4M3_MAX)
E4M3_MANTISSA_BITS = tl.constexpr(3)
E4M3_MIN_EXP = tl.constexpr(-6)  # smallest normal exponent; below it the quantum stays 2^-9
K_INV_ROW = tl.constexpr(kv_quant.K_INV)
V_INV_ROW = tl.constexpr(kv_quant.V_INV)


@triton.jit
def _round_e4m3(x):
    """fp32 x -> the nearest e4m3 value (ties to even), saturated at +-448, still as fp32.

    The quantum of |x| is 2^(e - 3) for its exponent e >= -6, 2^-9 below (subnormals). |x|
    divided by it (a power of two: exact) is r in [0, 16]; round half up, then undo the ties
    that landed on an odd integer. Every step is exact in fp32.
    """
    negative = x.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 and tiny negatives keep it
    a = tl.minimum(tl.abs(x), FP8_MAX)
    biased = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    q_exp = tl.maximum(biased, 127 + E4M3_MIN_EXP) - E4M3_MANTISSA_BITS  # biased exponent of the quantum
    q = (q_exp << 23).to(tl.float32, bitcast=True)
    inv_q = ((254 - q_exp) << 23).to(tl.float32, bitcast=True)
    r = a * inv_q
    t = (r + 0.5).to(tl.int32)
    tie = (t.to(tl.float32) - r) == 0.5
    t = tl.where(tie & ((t & 1) == 1), t - 1, t)
    y = t.to(tl.float32) * q
    return tl.where(negative, -y, y)


@triton.jit
def _to_cache(y, inv_scale, cache_ptr, KV_FP8: tl.constexpr):
    """Values [rows, cols] (rows = KV heads) as stored in the cache: cast, or fp8 with per-row inv_scale."""
    if KV_FP8:
        return _round_e4m3(y.to(tl.float32) * inv_scale[:, None]).to(cache_ptr.dtype.element_ty)
    return y.to(cache_ptr.dtype.element_ty)


@triton.jit
def _norm_rope_heads(
    x_ptr,  # token's first head: [num_heads, head_dim] with stride_head between heads
    num_heads,
    stride_head,
    cos,  # [HALF_PAD] fp32
    sin,  # [HALF_PAD] fp32
    w_ptr,  # [head_dim] RMSNorm weight, read only when NORM
    eps,
    cache_ptr,  # the token's cache slot is written only when STORE and slot >= 0
    slot,
    stride_c_blk, stride_c_head, stride_c_slot,
    inv_scale_ptr,  # [num_heads] fp32 reciprocal cache scales, read only when KV_FP8
    h_ptr,  # [HALF, HALF] fp32 normalised Hadamard matrix of half a head, read only when HADAMARD
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,  # next_pow2(head_dim - rotary_dim), 0 when fully rotary
    HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NORM: tl.constexpr,
    STORE: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is fp8 e4m3: scale, round, saturate
    HADAMARD: tl.constexpr,  # rotate the head by H (kv_quant.py): q in place, k only into the cache
):
    """[RMSNorm per head, then] rotate-half RoPE of every head, in place [and into the cache].

    Each head is read once, as three tiles: the two rotary halves and (partial rotary) the
    pass-through tail. The norm's sum of squares runs over all three, so it sees the whole
    head; the rounding points are those of `reference.rms_norm` followed by the RoPE.
    """
    dtype = x_ptr.dtype.element_ty
    offs_h = tl.arange(0, HEADS_PAD)
    offs_r = tl.arange(0, HALF_PAD)
    head_ok = offs_h < num_heads
    mask = head_ok[:, None] & (offs_r < HALF)[None, :]
    ptr1 = x_ptr + offs_h[:, None] * stride_head + offs_r[None, :]  # [HEADS_PAD, HALF_PAD]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    if PASS_PAD > 0 and (NORM or STORE):  # otherwise the tail is left as it is, unread
        offs_p = 2 * HALF + tl.arange(0, PASS_PAD)
        pmask = head_ok[:, None] & (offs_p < HEAD_DIM)[None, :]
        ptr_p = x_ptr + offs_h[:, None] * stride_head + offs_p[None, :]  # [HEADS_PAD, PASS_PAD]
        xp = tl.load(ptr_p, mask=pmask, other=0.0)  # in x's dtype
    if NORM:
        # HF order, as reference.rms_norm: normalise in fp32, round to x's dtype, then scale
        # by the weight (rounded again), and only then rotate.
        sum_sq = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)  # [HEADS_PAD]
        if PASS_PAD > 0:
            xpf = xp.to(tl.float32)
            sum_sq += tl.sum(xpf * xpf, 1)
        rstd = tl.rsqrt(sum_sq / HEAD_DIM + eps)[:, None]
        w1 = tl.load(w_ptr + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        if PASS_PAD > 0:
            wp = tl.load(w_ptr + offs_p, mask=offs_p < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
            xp = ((xpf * rstd).to(dtype).to(tl.float32) * wp).to(dtype)
            tl.store(ptr_p, xp, mask=pmask)
    y1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype)
    y2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype)
    r1 = y1
    r2 = y2
    if HADAMARD:  # [y1 | y2] H = [(y1 + y2) Hh | (y1 - y2) Hh] / sqrt(2), Hh the half-size H (full rotary)
        hm = tl.load(h_ptr + offs_r[:, None] * HALF + offs_r[None, :])  # [HALF, HALF]
        a = y1.to(tl.float32)
        b = y2.to(tl.float32)
        # full fp32 products ("ieee"): tf32's 10-bit inputs move outputs that nearly cancel by
        # several e4m3 steps; this dot is [HEADS_PAD, HALF] x [HALF, HALF], cheap either way
        r1 = tl.dot(a + b, hm, input_precision="ieee") * 0.7071067811865476  # [HEADS_PAD, HALF] fp32
        r2 = tl.dot(a - b, hm, input_precision="ieee") * 0.7071067811865476
    if HADAMARD and not STORE:  # q: attention reads it rotated
        tl.store(ptr1, r1.to(dtype), mask=mask)
        tl.store(ptr1 + HALF, r2.to(dtype), mask=mask)
    else:
        tl.store(ptr1, y1, mask=mask)
        tl.store(ptr1 + HALF, y2, mask=mask)
    if STORE and slot >= 0:  # STORE is constexpr: no store code at all for q
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        c = cache_ptr + blk * stride_c_blk + off * stride_c_slot + offs_h[:, None] * stride_c_head
        inv = tl.full([HEADS_PAD], 1.0, tl.float32)
        if KV_FP8:
            inv = tl.load(inv_scale_ptr + offs_h, mask=head_ok, other=1.0)  # [HEADS_PAD]
        tl.store(c + offs_r[None, :], _to_cache(r1, inv, cache_ptr, KV_FP8), mask=mask)
        tl.store(c + HALF + offs_r[None, :], _to_cache(r2, inv, cache_ptr, KV_FP8), mask=mask)
        if PASS_PAD > 0:  # partial rotary: the features past rotary_dim, not rotated
            tl.store(c + offs_p[None, :], _to_cache(xp, inv, cache_ptr, KV_FP8), mask=pmask)


@triton.jit
def _rope_store_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    positions_ptr,  # [num_tokens]
    cos_sin_ptr,  # [max_positions, rotary_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    q_norm_ptr,  # [head_dim], read only when Q_NORM
    k_norm_ptr,  # [head_dim], read only when K_NORM
    kv_scale_ptr,  # [4, num_kv_heads] fp32 (kv_quant.py), read only when KV_FP8
    h_ptr,  # [HALF, HALF] fp32 half-size normalised Hadamard matrix, read only when HADAMARD
    norm_eps,
    num_heads,
    num_kv_heads,
    stride_q_tok, stride_q_head,
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_cs_pos,
    stride_kc_blk, stride_kc_head, stride_kc_slot,
    stride_vc_blk, stride_vc_head, stride_vc_slot,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
    PASS_PAD: tl.constexpr,  # next_pow2(head_dim - rotary_dim), 0 when fully rotary
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache tokens per block
    STORE: tl.constexpr,  # False: rotate only (no cache given)
    Q_NORM: tl.constexpr,  # per-head RMSNorm of q before RoPE (Qwen3)
    K_NORM: tl.constexpr,  # per-head RMSNorm of k before RoPE (Qwen3)
    KV_FP8: tl.constexpr,  # fp8 cache: K and V scaled by their reciprocal scales and rounded to e4m3
    HADAMARD: tl.constexpr,  # fp8 cache, full rotary: q rewritten as H q, H k stored (kv_quant.py)
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    # Before the PDL wait: positions and slots are step inputs and the cos/sin table a constant
    # (kernels/pdl.py), so of the three dependent loads only the q/k/v one is left after it.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_r = tl.arange(0, HALF_PAD)
    cs_row = cos_sin_ptr + pos * stride_cs_pos
    cos = tl.load(cs_row + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)  # [HALF_PAD]
    sin = tl.load(cs_row + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
    slot = tok * 0 - 1  # no slot: nothing stored
    if STORE:
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    pdl_wait(USE_PDL)

    _norm_rope_heads(
        q_ptr + tok * stride_q_tok, num_heads, stride_q_head, cos, sin, q_norm_ptr, norm_eps,
        k_cache_ptr, slot, stride_kc_blk, stride_kc_head, stride_kc_slot, kv_scale_ptr, h_ptr,
        HEAD_DIM, HALF, HALF_PAD, PASS_PAD, HEADS_PAD, BLOCK_SIZE, Q_NORM, False, False, HADAMARD,
    )
    _norm_rope_heads(
        k_ptr + tok * stride_k_tok, num_kv_heads, stride_k_head, cos, sin, k_norm_ptr, norm_eps,
        k_cache_ptr, slot, stride_kc_blk, stride_kc_head, stride_kc_slot,
        kv_scale_ptr + K_INV_ROW * num_kv_heads, h_ptr,
        HEAD_DIM, HALF, HALF_PAD, PASS_PAD, KV_HEADS_PAD, BLOCK_SIZE, K_NORM, STORE, KV_FP8, HADAMARD,
    )  # rotated k (whole head) written to its cache slot as well

    if STORE and slot >= 0:  # v, whole head
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, KV_HEADS_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        vmask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        v = tl.load(v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :], mask=vmask)
        vc = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_slot + offs_h[:, None] * stride_vc_head
        inv = tl.full([KV_HEADS_PAD], 1.0, tl.float32)
        if KV_FP8:
            inv = tl.load(kv_scale_ptr + V_INV_ROW * num_kv_heads + offs_h, mask=offs_h < num_kv_heads, other=1.0)
        tl.store(vc + offs_d[None, :], _to_cache(v, inv, v_cache_ptr, KV_FP8), mask=vmask)


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    kv_scale_ptr,  # [4, num_kv_heads] fp32 (kv_quant.py), read only when KV_FP8
    num_kv_heads,
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_kc_blk, stride_kc_head, stride_kc_slot,
    stride_vc_blk, stride_vc_head, stride_vc_slot,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)  # a step input: read before the wait
    pdl_wait(USE_PDL)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, KV_HEADS_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :], mask=mask)
        kc = k_cache_ptr + blk * stride_kc_blk + off * stride_kc_slot + offs_h[:, None] * stride_kc_head
        vc = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_slot + offs_h[:, None] * stride_vc_head
        k_inv = tl.full([KV_HEADS_PAD], 1.0, tl.float32)
        v_inv = k_inv
        if KV_FP8:
            head_ok = offs_h < num_kv_heads
            k_inv = tl.load(kv_scale_ptr + K_INV_ROW * num_kv_heads + offs_h, mask=head_ok, other=1.0)
            v_inv = tl.load(kv_scale_ptr + V_INV_ROW * num_kv_heads + offs_h, mask=head_ok, other=1.0)
        tl.store(kc + offs_d[None, :], _to_cache(k, k_inv, k_cache_ptr, KV_FP8), mask=mask)
        tl.store(vc + offs_d[None, :], _to_cache(v, v_inv, v_cache_ptr, KV_FP8), mask=mask)


def _check_heads(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"{name} must be [num_tokens, num_heads, head_dim] with a contiguous last dim")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache / v_cache must both be [num_blocks, num_kv_heads, block_size, head_dim]")
    if k_cache.shape[1] != key.shape[1] or k_cache.shape[3] != key.shape[2]:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match key {tuple(key.shape)}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head_dim dimension of the caches must be contiguous")


def _check_norm_weight(name: str, w: Optional[torch.Tensor], head_dim: int) -> None:
    if w is not None and (w.dim() != 1 or w.shape[0] != head_dim or w.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous [{head_dim}] vector, got {tuple(w.shape)}")


def rope_and_store_kv(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] = cat(cos, sin)
    k_cache: Optional[torch.Tensor],  # [num_blocks, num_kv_heads, block_size, head_dim]; None: no store
    v_cache: Optional[torch.Tensor],
    slot_mapping: Optional[torch.Tensor],  # [num_tokens] int, -1 = skip
    q_norm_weight: Optional[torch.Tensor] = None,  # [head_dim]: per-head RMSNorm of q before RoPE
    k_norm_weight: Optional[torch.Tensor] = None,  # [head_dim]: per-head RMSNorm of k before RoPE
    norm_eps: float = 1e-6,
    *,
    pdl: bool = True,  # programmatic dependent launch where the device supports it (kernels/pdl.py)
    kv_scale: Optional[torch.Tensor] = None,  # [4, num_kv_heads] fp32: required by an fp8 cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """[RMSNorm q / k heads,] rotate q and k in place, store k and v into their cache slots.

    Returns (q, k), the input tensors themselves. With `q_norm_weight` / `k_norm_weight`
    (Qwen3's q_norm / k_norm) each head is first RMS-normalised over its whole head_dim,
    as `reference.rms_norm` would, in the same program: two launches per layer saved.
    """
    _check_heads("query", query)
    _check_heads("key", key)
    _check_heads("value", value)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[-1]
    if key.shape[0] != num_tokens or value.shape != key.shape or key.shape[2] != head_dim:
        raise ValueError(f"q/k/v shapes disagree: {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if rotary_dim % 2 or rotary_dim > head_dim or rotary_dim == 0:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
    if cos_sin_cache.stride(-1) != 1:
        raise ValueError("cos_sin_cache must have a contiguous last dim")
    _check_norm_weight("q_norm_weight", q_norm_weight, head_dim)
    _check_norm_weight("k_norm_weight", k_norm_weight, head_dim)
    store = k_cache is not None
    fp8 = False
    if store:
        _check_cache(k_cache, v_cache, key)
        fp8 = kv_quant.check_kv_scale(k_cache, kv_scale)
        if slot_mapping is None or slot_mapping.shape[0] != num_tokens:
            raise ValueError("slot_mapping must have one entry per token")
    if num_tokens == 0:
        return query, key
    half = rotary_dim // 2
    hadamard = fp8 and kv_quant.rotates_keys(head_dim, rotary_dim)
    # tl.dot (the Hadamard rotation) needs >= 16 rows: pad the head tiles (masked rows)
    min_heads = HADAMARD_MIN_ROWS if hadamard else 1
    heads_pad = max(min_heads, next_pow2(num_heads))
    kv_heads_pad = max(min_heads, next_pow2(num_kv_heads))
    dummy = key  # placeholder pointer for what is not given (never read or written)
    pdl = use_pdl(query, pdl)
    _rope_store_kernel[(num_tokens,)](
        query, key, value, positions, cos_sin_cache,
        k_cache if store else dummy, v_cache if store else dummy, slot_mapping if store else positions,
        q_norm_weight if q_norm_weight is not None else dummy,
        k_norm_weight if k_norm_weight is not None else dummy,
        kv_scale if fp8 else dummy,
        kv_quant.hadamard(half, query.device) if hadamard else dummy,
        float(norm_eps),
        num_heads, num_kv_heads,
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        cos_sin_cache.stride(0),
        *(k_cache.stride()[:3] if store else (0, 0, 0)),
        *(v_cache.stride()[:3] if store else (0, 0, 0)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=next_pow2(head_dim),
        HALF=half, HALF_PAD=next_pow2(half),
        PASS_PAD=next_pow2(head_dim - rotary_dim) if head_dim > rotary_dim else 0,
        HEADS_PAD=heads_pad, KV_HEADS_PAD=kv_heads_pad,
        BLOCK_SIZE=k_cache.shape[2] if store else 1, STORE=store,
        Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None, KV_FP8=fp8, HADAMARD=hadamard,
        num_warps=_num_warps(heads_pad * next_pow2(half)),
        USE_PDL=pdl, **pdl_launch_options(pdl),
    )
    return query, key


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
    *,
    pdl: bool = True,
    kv_scale: Optional[torch.Tensor] = None,  # [4, num_kv_heads] fp32: required by an fp8 cache
) -> None:
    """Write each token's K and V into its cache slot (no RoPE); `reference.store_kv` twin."""
    _check_heads("key", key)
    _check_heads("value", value)
    _check_cache(k_cache, v_cache, key)
    fp8 = kv_quant.check_kv_scale(k_cache, kv_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or slot_mapping.shape[0] != num_tokens:
        raise ValueError("key, value and slot_mapping must agree on num_tokens / shape")
    if num_tokens == 0:
        return
    kv_pad = next_pow2(num_kv_heads)
    d_pad = next_pow2(head_dim)
    pdl = use_pdl(key, pdl)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, kv_scale if fp8 else key, num_kv_heads,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, KV_HEADS_PAD=kv_pad, BLOCK_SIZE=k_cache.shape[2], KV_FP8=fp8,
        num_warps=_num_warps(kv_pad * d_pad),
        USE_PDL=pdl, **pdl_launch_options(pdl),
    )
