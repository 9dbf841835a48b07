"""Triton skinny GEMM over quantized weights: `x [M, K] @ dequant(W)[N, K]^T (+ b) -> [M, N]`
for decode row counts (M <= QGEMV_MAX_M), the dequantization fused in (weights unpacked in
registers, never written back), optionally with the layer's RMSNorm or SiLU-and-mul folded
in as a prologue on x. Formats: kernels/quant_formats.py.

Why. Batch-1 decode streams every weight once per token; at 1 or 0.5 byte per weight the
step reads 2-4x fewer bytes than bf16, if the unpacking keeps pace with HBM. On an H200
(4.2 TB/s, 132 SMs, ~1.8 GHz under load) int4 must deliver ~35 weights per SM per clock
against an issue rate of 128 thread-instructions per clock: under ~3.7 instructions per
weight, all included. So the unpacking avoids the slow paths:

  * no int -> float conversion instructions (16 per SM per clock on Hopper): a code is moved
    into the mantissa of an fp32 1.0 by bitwise ops, giving f = 1 + c * 2^-p exactly; the
    products x * f accumulate with plain FMAs and the 1.0 is removed once per 16-byte vector
    with the sum of its x values. int8: byte j shifted to bits 15..22 (one shift, one LOP3
    that also flips the sign bit). int4: w, rotl(w, 8), rotl(w, 16), rotl(w, 24) each hold two
    nibbles at bits 12..15 and 16..19, read in place by one LOP3 each, so a word of 8 codes
    costs 3 shifts, 8 LOP3 and 8 FMA per row of x (~3.8 instructions per weight at M = 1 with
    the x-side work, from SASS); the bits 12..15 codes are 1 + q / 2048 and their x is scaled by
    16 to share one accumulator (relative error ~1e-4, far under int4's own). Bit patterns are
    run-time arguments: as immediates, ptxas rematerialises them per use;
  * scales (and int4 offsets) once per vector: every vector lies inside one group;
  * the rest follows kernels/gemv.py: program p owns BLOCK_N weight rows for all M rows of x,
    threads side by side along K with one 16-byte vector each, the next chunk's words loaded
    before the current one is multiplied, weights loaded before the PDL wait, no split-K and
    no atomics (deterministic, one launch, graph-capturable once tuned).

Per vector of 4 words (int4: 32 codes), plane j (nibble j of each word) holds 4 consecutive k
(`quant_formats`), so the x values of a plane are one contiguous 8- or 16-byte load, in the
same register layout as the unpacked codes. Each FMA costs an instruction per row of x, so the
kernel pays off for a few rows (int4 up to ~2-4, int8 / fp8 up to ~8); `calibrate` picks.

fp8 (e4m3) keeps the natural layout; the hardware converts (cvt.f16x2.e4m3x2 on sm_89+), the
per-channel scale is applied after the K loop.

Tuning as gemv.py: `triton.autotune` keyed on (BLOCK_M, N, K, format, prologue), `warm_up`
before graph capture, `NotTunedError` instead of tuning inside a capture; `INTERPRET_CONFIG`
under TRITON_INTERPRET.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from nanovllm import envs
# the kernels' prologue codes (1: RMSNorm, 2: SiLU-and-mul), tuning error and operand checks are the bf16 GEMV's
from nanovllm.kernels.gemv import (PROLOGUE_NONE, PROLOGUE_RMS_NORM, PROLOGUE_SILU_MUL, NotTunedError, check_rows,
                                   new_output)
from nanovllm.kernels.launch_math import cdiv, next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl
from nanovllm.kernels.quant_formats import QuantizedWeight

QGEMV_MAX_M = 8
QGEMV_NAME = "quantized skinny GEMM"  # in its operand errors
INTERPRET = envs.triton_interpret()  # triton reads it at decoration, as here
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25

FORMAT_INT8 = 0
FORMAT_INT4 = 1
FORMAT_FP8 = 2
FORMAT_IDS = {"int8": FORMAT_INT8, "int4": FORMAT_INT4, "fp8": FORMAT_FP8}


# fp32 bit patterns of the code-in-mantissa trick
ONE_BITS = 0x3F800000  # 1.0
INT4_FIELD_12 = 0x0000F000  # mantissa bits 12..15: f = 1 + q / 2048
INT4_FIELD_16 = 0x000F0000  # mantissa bits 16..19: f = 1 + q / 128
INT8_FIELD = 0x007F8000  # mantissa bits 15..22: f = 1 + u / 256
INT8_ONE_FLIP = 0x3FC00000  # 1.0 with mantissa bit 22 set: xor flips the code's sign bit (q -> q + 128)


def _constants(qtype: str) -> tuple[int, int, int]:
    if qtype == "int4":
        return INT4_FIELD_12, INT4_FIELD_16, ONE_BITS
    return INT8_FIELD, INT8_ONE_FLIP, 0


class QGemvConfig(NamedTuple):
    block_n: int  # weight rows per program
    block_v: int  # 16-byte vectors per row per K chunk (>= 32 * num_warps: one per thread)
    num_warps: int
    num_stages: int


# One or two vectors per thread per row and chunk; small block_n for many programs on small
# N, larger for more loads in flight. int4 rows are short (K = 4096 is 128 vectors), so
# one- and two-warp programs cover a row in one chunk.
CONFIGS = (
    QGemvConfig(1, 32, 1, 1),
    QGemvConfig(2, 32, 1, 1),
    QGemvConfig(4, 32, 1, 1),
    QGemvConfig(2, 64, 2, 1),
    QGemvConfig(4, 64, 2, 1),
    QGemvConfig(1, 128, 4, 1),
    QGemvConfig(2, 128, 4, 1),
    QGemvConfig(4, 128, 4, 1),
    QGemvConfig(8, 128, 4, 1),
    QGemvConfig(4, 256, 4, 1),
)
INTERPRET_CONFIG = QGemvConfig(2, 4, 1, 1)  # CPU interpreter: several chunks and a tail on small K
MAX_ACC_PER_THREAD = 64  # prune configs whose per-thread partial sums exceed this many registers


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _ld(ptrs, mask, EVEN: tl.constexpr):
    """Activation-side load, kept in L1/L2 (every program reads it); unmasked when EVEN."""
    if EVEN:
        return tl.load(ptrs, eviction_policy="evict_last")
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_last")


@triton.jit
def _load_x(x_ptr, res_ptr, res_out_ptr, nw_ptr, row_x, row_res, row_rout, k_offs, K, store_res,
            PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN: tl.constexpr = False):
    """x[:, k_offs] in fp32 after the prologue, and (PROLOGUE_RMS_NORM only; else unused) its
    squares: the 1 / rms is applied at the end. row_*: [BLOCK_M, 1, ...] row offsets."""
    k_mask = k_offs < K
    x = _ld(x_ptr + row_x + k_offs, k_mask, EVEN)
    if PROLOGUE == 1:
        if HAS_RESIDUAL:
            r = _ld(res_ptr + row_res + k_offs, k_mask, EVEN)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the new residual, rounded like rmsnorm.py
            if EVEN:
                tl.store(res_out_ptr + row_rout + k_offs, x, mask=store_res)
            else:
                tl.store(res_out_ptr + row_rout + k_offs, x, mask=k_mask & store_res)
        xf = x.to(tl.float32)
        sq = xf * xf
        g = _ld(nw_ptr + k_offs, k_mask, EVEN).to(tl.float32)
        xf = xf * g
    elif PROLOGUE == 2:
        up = _ld(x_ptr + row_x + K + k_offs, k_mask, EVEN)
        gate = x.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32)  # silu rounded like activation.py
        xf = (act * up.to(tl.float32)).to(x.dtype).to(tl.float32)
        sq = xf
    else:
        xf = x.to(tl.float32)
        sq = xf
    return xf, sq


@triton.jit
def _rotl(w, R: tl.constexpr):
    """Rotate uint32 words left by R bits (one funnel shift)."""
    if R == 0:
        return w
    return (w << R) | (w >> (32 - R))


@triton.jit
def _int4_plane(w, r8, r16, r24, J: tl.constexpr, mask12, mask16, one):
    """Nibble j of every word as f = 1 + q / 128 (even j: field at bits 16..19) or
    1 + q / 2048 (odd j: bits 12..15), taken from w or a rotation of it (rotl 0 / 8 / 16 / 24
    brings two nibbles each to bits 12..19): three shifts per word, one LOP3 per code."""
    if J == 0:
        t = r16 & mask16
    elif J == 1:
        t = r8 & mask12
    elif J == 2:
        t = r8 & mask16
    elif J == 3:
        t = w & mask12
    elif J == 4:
        t = w & mask16
    elif J == 5:
        t = r24 & mask12
    elif J == 6:
        t = r24 & mask16
    else:
        t = r16 & mask12
    return (t | one).to(tl.float32, bitcast=True)


@triton.jit
def _int8_plane(w, J: tl.constexpr, field, one_flip):
    """Byte j of every word as f = 1 + (q + 128) / 256 (field at bits 15..22; the xor sets the
    exponent of 1.0 and flips the code's sign bit)."""
    if 15 - 8 * J >= 0:
        t = w << (15 - 8 * J)
    else:
        t = w >> (8 * J - 15)
    return ((t & field) ^ one_flip).to(tl.float32, bitcast=True)


@triton.jit
def _words_kernel(
    x_ptr,  # [M, K] ([M, 2K] for PROLOGUE_SILU_MUL), row stride stride_xm
    w_ptr,  # int32 [N, KW] vector-planar words (quant_formats), row stride stride_wn
    s_ptr,  # [N, groups] scales, row stride stride_sn
    b_ptr,  # int4: [N, groups] offsets (same strides as s); int8: unused
    bias_ptr,  # [N] linear bias (HAS_BIAS)
    out_ptr,  # [M, N], row stride stride_om
    nw_ptr,  # [K] RMSNorm weight (PROLOGUE_RMS_NORM)
    res_ptr, res_out_ptr,  # [M, K] residual in / x + residual out (PROLOGUE_RMS_NORM + HAS_RESIDUAL)
    M, N, K,  # K: logical input features (x columns; codes past K are padding)
    NV,  # vectors per row (K_pad / VEC)
    stride_xm, stride_wn, stride_sn, stride_om, stride_rm, stride_rom,
    eps,
    c0, c1, c2,  # unpacking bit patterns, run-time values so that they stay in registers (_constants)
    IS_INT4: tl.constexpr,
    PER_CHANNEL: tl.constexpr,  # one scale per row (int8): applied after the K loop
    VECS_PER_GROUP: tl.constexpr,  # G / VEC (grouped formats)
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,  # vectors per row per chunk
    EVEN: tl.constexpr,  # K == NV * VEC and whole chunks: no load masks
):
    PLANES: tl.constexpr = 8 if IS_INT4 else 4  # codes per word
    VEC: tl.constexpr = 4 * PLANES  # codes per vector (4 words)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows_n = (offs_n % N).to(tl.int64)  # past-the-end rows re-read valid ones; not stored
    offs_m = tl.arange(0, BLOCK_M)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)  # padding rows re-read row M-1; not stored
    offs_v = tl.arange(0, BLOCK_V)  # [BV]
    offs_i = tl.arange(0, 4)  # word within a vector
    # 4-D tiles [M, N, V, word]: the unpacked codes [1, BN, BV, 4] and x [BM, 1, BV, 4] share
    # one register layout (each thread: one vector's 4 words = 16 bytes)
    w_ptrs = (w_ptr + (rows_n * stride_wn)[None, :, None, None]
              + (offs_v * 4)[None, None, :, None] + offs_i[None, None, None, :])  # [1, BN, BV, 4]
    k_base = (offs_v * VEC)[None, None, :, None] + offs_i[None, None, None, :]  # [1, 1, BV, 4]: k of plane 0
    row_x = (rows_m * stride_xm)[:, None, None, None]  # [BM, 1, 1, 1]
    row_res = (rows_m * stride_rm)[:, None, None, None]
    row_rout = (rows_m * stride_rom)[:, None, None, None]
    store_res = (offs_m < tl.where(pid == 0, M, 0))[:, None, None, None]  # program 0 writes the residual
    s_rows = (rows_n * stride_sn)[None, :, None]  # [1, BN, 1]

    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_V], dtype=tl.float32)  # grouped: scaled partial sums
    acc_sx = tl.zeros([BLOCK_M, 1, BLOCK_V], dtype=tl.float32)  # per channel: sums of x
    sumsq = tl.zeros([BLOCK_M, 1, BLOCK_V, 4], dtype=tl.float32)

    if EVEN:
        w = tl.load(w_ptrs, eviction_policy="evict_first")  # chunk 0
    else:
        w = tl.load(w_ptrs, mask=(offs_v < NV)[None, None, :, None], other=0, eviction_policy="evict_first")
    pdl_wait(USE_PDL)
    for v0 in range(0, NV, BLOCK_V):
        # the next chunk's words are in flight while this one is multiplied (the last
        # iteration's prefetch is masked off)
        vmask_next = (offs_v + v0 + BLOCK_V < NV)[None, None, :, None]
        w_next = tl.load(w_ptrs + (v0 + BLOCK_V) * 4, mask=vmask_next, other=0, eviction_policy="evict_first")
        wu = w.to(tl.uint32, bitcast=True)
        if IS_INT4:
            r8, r16, r24 = _rotl(wu, 8), _rotl(wu, 16), _rotl(wu, 24)
        part = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_V, 4], dtype=tl.float32)  # sum over planes of x * f
        sx = tl.zeros([BLOCK_M, 1, BLOCK_V, 4], dtype=tl.float32)  # int4: x of the even planes
        sx12 = tl.zeros([BLOCK_M, 1, BLOCK_V, 4], dtype=tl.float32)  # int4: x of the odd planes
        for j in tl.static_range(PLANES):
            k_offs = k_base + (v0 * VEC + 4 * j)
            xj, sq = _load_x(x_ptr, res_ptr, res_out_ptr, nw_ptr, row_x, row_res, row_rout, k_offs, K,
                             store_res, PROLOGUE, HAS_RESIDUAL, EVEN)
            if IS_INT4:
                f = _int4_plane(wu, r8, r16, r24, j, c0, c1, c2)
                if j % 2 == 0:
                    part = tl.fma(xj, f, part)
                    sx += xj
                else:  # q / 2048: x scaled by 16 puts it on the even planes' q / 128
                    part = tl.fma(xj * 16.0, f, part)
                    sx12 += xj
            else:
                part = tl.fma(xj, _int8_plane(wu, j, c0, c1), part)
                sx += xj
            if PROLOGUE == 1:
                sumsq += sq
        p = tl.sum(part, axis=3)  # [BM, BN, BV]
        sxv = tl.sum(sx, axis=3)  # [BM, 1, BV]
        if PER_CHANNEL:  # int8, one scale per row: q = 256 f - 384, scaled after the loop
            acc += p
            acc_sx += sxv
        else:
            g_offs = s_rows + ((offs_v + v0) // VECS_PER_GROUP)[None, None, :]  # [1, BN, BV]
            gmask = (offs_v + v0 < NV)[None, None, :]
            if EVEN:
                s = tl.load(s_ptr + g_offs).to(tl.float32)
            else:
                s = tl.load(s_ptr + g_offs, mask=gmask, other=0.0).to(tl.float32)
            if IS_INT4:  # sum x q = 128 (p - sx_even - 16 sx_odd); w = s q + b
                if EVEN:
                    b = tl.load(b_ptr + g_offs).to(tl.float32)
                else:
                    b = tl.load(b_ptr + g_offs, mask=gmask, other=0.0).to(tl.float32)
                sx12v = tl.sum(sx12, axis=3)
                acc += (128.0 * s) * p + (b - 128.0 * s) * sxv + (b - 2048.0 * s) * sx12v
            else:  # w = s q = s (256 f - 384)
                acc += s * (256.0 * p - 384.0 * sxv)
        w = w_next

    if PER_CHANNEL:
        s = tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)  # [BN]
        out = (256.0 * tl.sum(acc, axis=2) - 384.0 * tl.sum(acc_sx, axis=2)) * s[None, :]
    else:
        out = tl.sum(acc, axis=2)  # [BM, BN]
    if PROLOGUE == 1:
        ss = tl.sum(tl.sum(sumsq, axis=3), axis=2)  # [BM, 1]
        out = out * tl.rsqrt(ss / K + eps)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_kernel(
    x_ptr, w_ptr,  # w: float8e4nv [N, K], row stride stride_wn
    s_ptr,  # [N] fp32 scales (row stride stride_sn)
    b_ptr,  # unused (signature shared with _words_kernel)
    bias_ptr, out_ptr, nw_ptr, res_ptr, res_out_ptr,
    M, N, K,
    NV,  # 8-value vectors per row (cdiv(K, 8))
    stride_xm, stride_wn, stride_sn, stride_om, stride_rm, stride_rom,
    eps, c0, c1, c2,  # unused
    IS_INT4: tl.constexpr, PER_CHANNEL: tl.constexpr, VECS_PER_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, EVEN: tl.constexpr,
):
    VEC: tl.constexpr = 8  # e4m3 values per thread and row per chunk (8 bytes; x: one 16-byte load)
    BLOCK_K: tl.constexpr = BLOCK_V * VEC
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = (offs_n % N).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    # Contiguity capped at 8: the e4m3 loads become 8-byte vectors, the same 8-element-per-
    # thread layout as x's 16-byte bf16 loads, so their product needs no layout conversion
    # (uncapped, the 16-wide fp8 tile and the 8-wide x tile meet through shared memory).
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), 8), 8)[None, None, :]  # [1, 1, BK]
    w_ptrs = w_ptr + (rows_n * stride_wn)[None, :, None] + offs_k  # [1, BN, BK]
    row_x = (rows_m * stride_xm)[:, None, None]
    row_res = (rows_m * stride_rm)[:, None, None]
    row_rout = (rows_m * stride_rom)[:, None, None]
    store_res = (offs_m < tl.where(pid == 0, M, 0))[:, None, None]

    # per-thread partial sums of every product (FMA), reduced across the row after the loop
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M, 1, BLOCK_K], dtype=tl.float32)
    if EVEN:
        w = tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptrs, mask=offs_k < K, other=0.0, eviction_policy="evict_first")
    pdl_wait(USE_PDL)
    for k0 in range(0, K, BLOCK_K):
        w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=offs_k + k0 + BLOCK_K < K, other=0.0,
                         eviction_policy="evict_first")
        x, sq = _load_x(x_ptr, res_ptr, res_out_ptr, nw_ptr, row_x, row_res, row_rout, offs_k + k0, K,
                        store_res, PROLOGUE, HAS_RESIDUAL, EVEN)
        acc = tl.fma(x, w.to(tl.float32), acc)  # [BM, 1, BK] x [1, BN, BK]
        if PROLOGUE == 1:
            sumsq += sq
        w = w_next

    s = tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)
    out = tl.sum(acc, axis=2) * s[None, :]  # [BM, BN]
    if PROLOGUE == 1:
        out = out * tl.rsqrt(tl.sum(sumsq, axis=2) / K + eps)  # [BM, 1]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch


def _fits(block_m: int, block_n: int, block_v: int, num_warps: int, values_per_vector: int = 4) -> bool:
    """Per-thread partial sums: 4 word lanes (int8 / int4) or 8 values (fp8) per vector."""
    per_thread = max(1, block_v // (32 * num_warps))  # vectors per row per thread
    return block_m * block_n * per_thread * values_per_vector <= MAX_ACC_PER_THREAD


def _even(k: int, nv: int, block_v: int, is_int4: bool, is_fp8: bool = False) -> bool:
    """No load needs a mask: x has exactly the packed width and the chunks tile the row."""
    return k == nv * (32 if is_int4 else 8 if is_fp8 else 16) and nv % block_v == 0


def _pruner(values_per_vector: int):
    def prune(configs, named_args, **kwargs):
        """Drop configs with too many partial sums per thread at this BLOCK_M or a chunk far
        wider than the row (threads with nothing to load); keep at least one."""
        block_m, nv = kwargs["BLOCK_M"], named_args["NV"]
        kept = [c for c in configs
                if _fits(block_m, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.num_warps, values_per_vector)
                and c.kwargs["BLOCK_V"] < 2 * next_pow2(nv)]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"])]

    return prune


def _autotuned(kernel, fp8: bool):
    configs = [triton.Config({"BLOCK_N": c.block_n, "BLOCK_V": c.block_v}, num_warps=c.num_warps,
                             num_stages=c.num_stages) for c in CONFIGS]
    key = ["BLOCK_M", "N", "K", "NV", "IS_INT4", "PER_CHANNEL", "VECS_PER_GROUP", "PROLOGUE", "HAS_RESIDUAL"]
    from triton.testing import do_bench

    bench = functools.partial(do_bench, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS)
    prune = {"early_config_prune": _pruner(8 if fp8 else 4)}
    kernel = triton.heuristics({"EVEN": lambda a: _even(a["K"], a["NV"], a["BLOCK_V"], a["IS_INT4"], fp8)})(kernel)
    for extra in (dict(do_bench=bench, cache_results=True), dict(do_bench=bench), {}):
        try:
            return triton.autotune(configs=configs, key=key, prune_configs_by=prune, **extra)(kernel)
        except TypeError:
            if not extra:
                raise


_TUNED = {} if INTERPRET else {"words": _autotuned(_words_kernel, False), "fp8": _autotuned(_fp8_kernel, True)}
_tuned_keys: set = set()


def _check_weight(qw: QuantizedWeight, bias: Optional[torch.Tensor], k: int) -> None:
    if qw.in_features != k:
        raise ValueError(f"x has {k} features, the quantized weight expects {qw.in_features}")
    if qw.data.stride(1) != 1 or qw.scales.stride(1) != 1:
        raise ValueError("quantized weight tensors must be contiguous along K")
    n = qw.out_features
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n}] vector, got {tuple(bias.shape)}")


def _launch(x, qw: QuantizedWeight, bias, out, config, prologue=PROLOGUE_NONE, norm_weight=None, eps=0.0,
            residual=None, residual_out=None, pdl: bool = True) -> None:
    m, n, k = out.shape[0], out.shape[1], qw.in_features
    block_m = next_pow2(m)
    is_fp8 = qw.qtype == "fp8"
    name = "fp8" if is_fp8 else "words"
    nv = cdiv(k, 8) if is_fp8 else qw.data.shape[1] // 4
    vec = 16 if is_fp8 else (32 if qw.qtype == "int4" else 16)
    pdl = use_pdl(x, pdl)
    has_res = residual is not None
    res, res_out = (residual, residual_out) if has_res else (x, x)
    placeholder = qw.scales
    args = (x, qw.data, qw.scales, qw.biases if qw.biases is not None else placeholder,
            bias if bias is not None else placeholder, out,
            norm_weight if norm_weight is not None else placeholder, res, res_out,
            m, n, k, nv, x.stride(0), qw.data.stride(0), qw.scales.stride(0), out.stride(0),
            res.stride(0), res_out.stride(0), float(eps), *_constants(qw.qtype))
    per_channel = qw.per_channel and qw.qtype == "int8"  # int4 takes the per-group path even for one group
    flags = dict(IS_INT4=qw.qtype == "int4", PER_CHANNEL=per_channel,
                 VECS_PER_GROUP=1 if per_channel or is_fp8 else qw.group_size // vec, HAS_BIAS=bias is not None,
                 PROLOGUE=prologue, HAS_RESIDUAL=has_res, USE_PDL=pdl, BLOCK_M=block_m,
                 **pdl_launch_options(pdl))
    if config is None and name in _TUNED:
        key = (name, block_m, n, k, nv, qw.qtype, qw.per_channel, qw.group_size, prologue, has_res, x.dtype,
               qw.scales.dtype, None if bias is None else bias.dtype)
        if key not in _tuned_keys:
            if torch.cuda.is_current_stream_capturing():
                raise NotTunedError(f"quantized skinny GEMM {qw.qtype} M<={block_m} N={n} K={k} (prologue "
                                    f"{prologue}) is not tuned yet; call quant_gemv.warm_up before capturing")
            _tuned_keys.add(key)
        _TUNED[name][lambda meta: (cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
        return
    c = config or INTERPRET_CONFIG
    kernel = _fp8_kernel if is_fp8 else _words_kernel  # looked up per call: tools swap them for recorders
    kernel[(cdiv(n, c.block_n),)](*args, **flags, BLOCK_N=c.block_n, BLOCK_V=c.block_v,
                                  EVEN=_even(k, nv, c.block_v, qw.qtype == "int4", is_fp8),
                                  num_warps=c.num_warps, num_stages=c.num_stages)


def quant_skinny_gemm(
    x: torch.Tensor,  # [M, K], M <= QGEMV_MAX_M
    qw: QuantizedWeight,  # [N, K]
    bias: Optional[torch.Tensor] = None,  # [N]
    out: Optional[torch.Tensor] = None,  # [M, N]
    config: Optional[QGemvConfig] = None,
    pdl: bool = True,  # programmatic dependent launch where the device supports it (kernels/pdl.py)
) -> torch.Tensor:
    """x @ dequant(W)^T (+ bias), fp32 accumulation, returned in x's dtype ([M, N])."""
    x = check_rows(x, QGEMV_MAX_M, QGEMV_NAME)
    m, k = x.shape
    _check_weight(qw, bias, k)
    out = new_output(x, qw.out_features, out)
    if m and qw.out_features:
        _launch(x, qw, bias, out, config, pdl=pdl)
    return out


def quant_rms_norm_skinny_gemm(
    x: torch.Tensor,  # [M, K]
    residual: Optional[torch.Tensor],  # [M, K] or None
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    config: Optional[QGemvConfig] = None,
    pdl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x [+ residual]) @ dequant(W)^T (+ bias), the new residual) in one kernel;
    numerics as `gemv.rms_norm_skinny_gemm` (the normalised x is never rounded)."""
    x = check_rows(x, QGEMV_MAX_M, QGEMV_NAME)
    m, k = x.shape
    _check_weight(qw, bias, k)
    if norm_weight.shape != (k,) or norm_weight.stride(0) != 1:
        raise ValueError(f"norm_weight must be a contiguous [{k}] vector, got {tuple(norm_weight.shape)}")
    residual_out = x
    if residual is not None:
        if residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype} with a contiguous last dim")
        residual_out = torch.empty_like(x)
    out = new_output(x, qw.out_features, None)
    if m and qw.out_features:
        _launch(x, qw, bias, out, config, PROLOGUE_RMS_NORM, norm_weight, eps, residual,
                None if residual is None else residual_out, pdl=pdl)
    elif m and residual is not None:
        residual_out.copy_(x + residual)
    return out, residual_out


def quant_silu_mul_skinny_gemm(
    x: torch.Tensor,  # [M, 2K] = [gate | up]
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    config: Optional[QGemvConfig] = None,
    pdl: bool = True,
) -> torch.Tensor:
    """(silu(gate) * up) @ dequant(W)^T (+ bias) in one kernel."""
    x = check_rows(x, QGEMV_MAX_M, QGEMV_NAME)
    m, two_k = x.shape
    if two_k % 2:
        raise ValueError(f"quant_silu_mul_skinny_gemm needs x [M, 2K], got an odd last dim {two_k}")
    _check_weight(qw, bias, two_k // 2)
    out = new_output(x, qw.out_features, None)
    if m and qw.out_features:
        _launch(x, qw, bias, out, config, PROLOGUE_SILU_MUL, pdl=pdl)
    return out


def warm_up(qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, max_m: int = QGEMV_MAX_M,
            dtype: torch.dtype = torch.bfloat16, prologues=(PROLOGUE_NONE,), pdl: bool = True) -> None:
    """Tune (and compile) every row bucket up to max_m for this weight and each prologue, so
    that no later call benchmarks (e.g. inside a CUDA-graph capture)."""
    k, device = qw.in_features, qw.data.device
    x = torch.zeros(QGEMV_MAX_M, 2 * k, dtype=dtype, device=device)
    norm_weight = torch.ones(k, dtype=dtype, device=device)
    buckets = [1 << i for i in range(QGEMV_MAX_M.bit_length()) if 1 << i <= min(max_m, QGEMV_MAX_M)]
    for m in buckets:
        for prologue in prologues:
            if prologue == PROLOGUE_RMS_NORM:
                quant_rms_norm_skinny_gemm(x[:m, :k], x[:m, k:], norm_weight, 1e-6, qw, bias, pdl=pdl)
            elif prologue == PROLOGUE_SILU_MUL:
                quant_silu_mul_skinny_gemm(x[:m], qw, bias, pdl=pdl)
            else:
                quant_skinny_gemm(x[:m, :k], qw, bias, pdl=pdl)
