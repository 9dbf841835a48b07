"""Quantized-weight GEMMs for any row count: a tensor-core Triton kernel with the weight
dequantized in registers (decode batches past the skinny kernel's reach, M ~ 8..256), and the
large-M paths (dequantize once into a bf16 scratch + cuBLAS; fp8 through torch._scaled_mm).

Why three paths. The skinny kernel (quant_gemv.py) spends one FMA per weight per row of x,
fine for a few rows. Past that, the multiply belongs on the tensor cores: `_dot_kernel`
unpacks a `[BLOCK_N, chunk]` tile of codes in registers (the same code-in-mantissa trick and
vector-planar layout as quant_gemv), scales it to bf16, and feeds `tl.dot` with the matching
columns of x, computing `W_tile @ x^T` ("swap AB": the weight rows fill the MMA's 16..128-row
side, the few rows of x its narrow side). Weight bytes stay packed all the way from HBM; the
tile never exists in memory in bf16. For prefill-sized M the GEMM is compute bound and
cuBLAS is the better tensor-core user: `dequantize` writes the bf16 weight once (a transient
scratch the caching allocator recycles layer to layer) and `F.linear` runs; fp8 can instead
run on the fp8 tensor cores (`scaled_mm_fp8`, per-row activation scales: W8A8 there, as vLLM's
fp8 does on Hopper).

Exactness. fp8 values and int8 codes are exact in bf16, so with one scale per output channel
the dot runs on the raw codes and the scale multiplies the fp32 result; grouped int8 and int4
tiles are scaled before the dot and rounded once to bf16 (int4's own error is ~100x that).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from nanovllm import envs
from nanovllm.kernels.gemv import NotTunedError  # one error for every kernel's untuned-in-capture case
from nanovllm.kernels.launch_math import cdiv, next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl
from nanovllm.kernels.quant_formats import FP8_DTYPE, FP8_MAX, QuantizedWeight
from nanovllm.kernels.quant_gemv import ONE_BITS, _constants, _int8_plane, _rotl

INTERPRET = envs.triton_interpret()  # triton reads it at decoration, as here
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25
DOT_MAX_BLOCK_M = 128  # x rows per program at most (the MMA's narrow side)
MIN_FP8_SCALE = 1e-12


class QDotConfig(NamedTuple):
    block_n: int  # weight rows per program (the MMA's M side)
    block_m: int  # x rows per program (cap; the launcher uses min(this, next_pow2(M)) >= 16)
    block_w: int  # int32 words per weight row per K chunk (fp8: 4-byte groups), >= 16
    num_warps: int
    num_stages: int


CONFIGS = (
    QDotConfig(16, 16, 16, 1, 2),
    QDotConfig(32, 16, 16, 2, 2),
    QDotConfig(64, 16, 16, 2, 3),
    QDotConfig(64, 32, 16, 4, 3),
    QDotConfig(64, 64, 16, 4, 3),
    QDotConfig(128, 64, 16, 4, 3),
    QDotConfig(64, 128, 16, 4, 3),
    QDotConfig(128, 128, 16, 8, 3),
)
INTERPRET_CONFIG = QDotConfig(16, 16, 16, 1, 1)


@triton.jit
def _int4_code_plane(w, J: tl.constexpr, field, one):
    """Nibble j of every uint32 word as f = 1 + q / 16 (field 0x00780000, bits 19..22), one
    funnel shift and one LOP3 per code; field / one are run-time values (kept in registers)."""
    t = _rotl(w, (19 - 4 * J) % 32)
    return ((t & field) | one).to(tl.float32, bitcast=True)


@triton.jit
def _mma(w, xt, acc, DOT_F32: tl.constexpr):
    """acc += w [BN, BK] @ xt [BK, BM] with bf16 operands (fp32 for fp32 x: the interpreter
    has no bf16 products, and fp32 callers expect fp32 results)."""
    if DOT_F32:
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w.to(tl.bfloat16), xt.to(tl.bfloat16), acc)


@triton.jit
def _dot_kernel(
    x_ptr,  # [M, K], row stride stride_xm
    w_ptr,  # int8 / int4: int32 [N, K_pad / (4 | 8)] words; fp8: [N, K] e4m3
    s_ptr, b_ptr,  # scales [N, groups] (fp8 / per-channel int8: [N, 1]); int4 offsets
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    M, N, K, KW,  # KW: words (fp8: 4-byte groups) per weight row
    stride_xm, stride_wn, stride_sn, stride_om,
    c0, c1,  # unpacking bit patterns (_unpack_constants)
    FORMAT: tl.constexpr,  # 0 int8, 1 int4, 2 fp8
    SCALE_AFTER: tl.constexpr,  # one scale per output channel: dot on raw codes, scale the result
    VECS_PER_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_PDL: tl.constexpr,
    M_BUCKET: tl.constexpr,  # autotuning key only: next_pow2(M) in [16, DOT_MAX_BLOCK_M]
    DOT_F32: tl.constexpr,  # fp32 x (CPU interpreter tests): fp32 operands, IEEE products
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = (offs_n % N).to(tl.int64)  # past-the-end rows re-read valid ones; not stored
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_W)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T tile
    s_rows = (rows_n * stride_sn)[:, None]  # [BN, 1]
    x_rows = (rows_m * stride_xm)[None, :]  # [1, BM]
    pdl_wait(USE_PDL)
    if FORMAT == 2:  # fp8, natural layout: chunk = 4 * BLOCK_W values
        BLOCK_K: tl.constexpr = 4 * BLOCK_W
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + (rows_n * stride_wn)[:, None] + offs_k[None, :]  # [BN, BK]
        for k0 in range(0, K, BLOCK_K):
            kmask = offs_k + k0 < K
            w = tl.load(w_ptrs + k0, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
            xt = tl.load(x_ptr + x_rows + (offs_k + k0)[:, None], mask=kmask[:, None], other=0.0)  # [BK, BM]
            acc = _mma(w, xt, acc, DOT_F32)
    else:
        PLANES: tl.constexpr = 8 if FORMAT == 1 else 4
        VEC: tl.constexpr = 4 * PLANES
        w_ptrs = w_ptr + (rows_n * stride_wn)[:, None] + offs_w[None, :]  # [BN, BW]
        for w0 in range(0, KW, BLOCK_W):
            wmask = offs_w + w0 < KW
            w = tl.load(w_ptrs + w0, mask=wmask[None, :], other=0, eviction_policy="evict_first")
            wu = w.to(tl.uint32, bitcast=True)
            vec = (offs_w + w0) // 4  # [BW] vector of each word
            k_base = vec * VEC + (offs_w + w0) % 4  # k of plane 0
            if not SCALE_AFTER:
                g_offs = s_rows + (vec // VECS_PER_GROUP)[None, :]  # [BN, BW]
                s = tl.load(s_ptr + g_offs, mask=wmask[None, :], other=0.0).to(tl.float32)
                if FORMAT == 1:  # w = s q + b, q = 16 f - 16
                    b = tl.load(b_ptr + g_offs, mask=wmask[None, :], other=0.0).to(tl.float32)
                    a = 16.0 * s
                    c = b - 16.0 * s
                else:  # w = s q, q = 256 f - 384
                    a = 256.0 * s
                    c = -384.0 * s
            for j in tl.static_range(PLANES):
                if FORMAT == 1:
                    f = _int4_code_plane(wu, j, c0, c1)
                else:
                    f = _int8_plane(wu, j, c0, c1)
                if SCALE_AFTER:  # int8 per channel: the integer code, exact in bf16
                    wj = 256.0 * f - 384.0
                else:
                    wj = a * f + c
                kj = k_base + 4 * j
                xt = tl.load(x_ptr + x_rows + kj[:, None], mask=(kj < K)[:, None], other=0.0)  # [BW, BM]
                acc = _mma(wj, xt, acc, DOT_F32)
    if SCALE_AFTER:
        acc = acc * tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, b_ptr, out_ptr,  # out: [N, K] row stride K
    N, K, KW, stride_wn, stride_sn,
    c0, c1,
    FORMAT: tl.constexpr, VECS_PER_GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_W words] tile of codes -> the bf16 / fp16 weight (out's dtype)."""
    pid_n, pid_w = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    nmask = (offs_n < N)[:, None]
    wmask = nmask & (offs_w < KW)[None, :]
    rows = offs_n.to(tl.int64)
    if FORMAT == 2:
        BLOCK_K: tl.constexpr = 4 * BLOCK_W
        offs_k = pid_w * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = nmask & (offs_k < K)[None, :]
        w = tl.load(w_ptr + (rows * stride_wn)[:, None] + offs_k[None, :], mask=kmask, other=0.0)
        s = tl.load(s_ptr + rows * stride_sn, mask=offs_n < N, other=0.0)
        val = w.to(tl.float32) * s[:, None]
        tl.store(out_ptr + (rows * K)[:, None] + offs_k[None, :], val.to(out_ptr.dtype.element_ty), mask=kmask)
    else:
        PLANES: tl.constexpr = 8 if FORMAT == 1 else 4
        VEC: tl.constexpr = 4 * PLANES
        w = tl.load(w_ptr + (rows * stride_wn)[:, None] + offs_w[None, :], mask=wmask, other=0)
        wu = w.to(tl.uint32, bitcast=True)
        vec = offs_w // 4
        g_offs = (rows * stride_sn)[:, None] + (vec // VECS_PER_GROUP)[None, :]
        s = tl.load(s_ptr + g_offs, mask=wmask, other=0.0).to(tl.float32)
        if FORMAT == 1:
            b = tl.load(b_ptr + g_offs, mask=wmask, other=0.0).to(tl.float32)
            a = 16.0 * s
            c = b - 16.0 * s
        else:
            a = 256.0 * s
            c = -384.0 * s
        k_base = vec * VEC + offs_w % 4
        for j in tl.static_range(PLANES):
            if FORMAT == 1:
                f = _int4_code_plane(wu, j, c0, c1)
            else:
                f = _int8_plane(wu, j, c0, c1)
            kj = k_base + 4 * j
            tl.store(out_ptr + (rows * K)[:, None] + kj[None, :], (a * f + c).to(out_ptr.dtype.element_ty),
                     mask=wmask & (kj < K)[None, :])


# ----------------------------------------------------------------------------- launch

_FORMATS = {"int8": 0, "int4": 1, "fp8": 2}


def _prune(configs, named_args, **kwargs):
    """Keep configs whose x tile fits the row bucket (no all-padding tiles) and whose chunk
    does not far exceed a weight row."""
    bucket, kw = kwargs["M_BUCKET"], named_args["KW"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, bucket) and c.kwargs["BLOCK_W"] <= max(16, kw)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"])]


def _autotuned():
    configs = [triton.Config({"BLOCK_N": c.block_n, "BLOCK_M": c.block_m, "BLOCK_W": c.block_w},
                             num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS]
    key = ["M_BUCKET", "N", "K", "FORMAT", "SCALE_AFTER", "VECS_PER_GROUP"]
    from triton.testing import do_bench

    bench = functools.partial(do_bench, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS)

    prune = {"early_config_prune": _prune}
    for extra in (dict(do_bench=bench, cache_results=True), dict(do_bench=bench), {}):
        try:
            return triton.autotune(configs=configs, key=key, prune_configs_by=prune, **extra)(_dot_kernel)
        except TypeError:
            if not extra:
                raise


_tuned_kernel = None if INTERPRET else _autotuned()
_tuned_keys: set = set()


INT4_FIELD_19 = 0x00780000  # mantissa bits 19..22: f = 1 + q / 16


def _unpack_constants(qtype: str) -> tuple[int, int]:
    if qtype == "int4":
        return INT4_FIELD_19, ONE_BITS
    c0, c1, _ = _constants("int8")
    return c0, c1


def _m_bucket(m: int) -> int:
    return min(next_pow2(max(m, 16)), DOT_MAX_BLOCK_M)


def quant_dot_gemm(
    x: torch.Tensor,  # [M, K]
    qw: QuantizedWeight,  # [N, K]
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[QDotConfig] = None,
    pdl: bool = True,
) -> torch.Tensor:
    """x @ dequant(W)^T (+ bias) on the tensor cores, any M; returned in x's dtype ([M, N])."""
    if x.dim() != 2 or x.shape[1] != qw.in_features:
        raise ValueError(f"x must be [M, {qw.in_features}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qw.out_features
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    fmt = _FORMATS[qw.qtype]
    scale_after = qw.qtype == "fp8" or (qw.qtype == "int8" and qw.per_channel)
    vec = 32 if qw.qtype == "int4" else 16
    kw = cdiv(k, 4) if qw.qtype == "fp8" else qw.data.shape[1]
    pdl = use_pdl(x, pdl)
    c0, c1 = _unpack_constants(qw.qtype)
    args = (x, qw.data, qw.scales, qw.biases if qw.biases is not None else qw.scales,
            bias if bias is not None else qw.scales, out, m, n, k, kw, x.stride(0), qw.data.stride(0),
            qw.scales.stride(0), out.stride(0), c0, c1)
    flags = dict(FORMAT=fmt, SCALE_AFTER=scale_after, DOT_F32=x.dtype == torch.float32,
                 VECS_PER_GROUP=1 if scale_after else qw.group_size // vec, HAS_BIAS=bias is not None,
                 USE_PDL=pdl, **pdl_launch_options(pdl))
    if config is None and _tuned_kernel is not None:
        bucket = _m_bucket(m)
        key = (bucket, n, k, fmt, scale_after, qw.group_size, x.dtype, qw.scales.dtype)
        if key not in _tuned_keys:
            if torch.cuda.is_current_stream_capturing():
                raise NotTunedError(f"quantized dot GEMM {qw.qtype} M~{bucket} N={n} K={k} is not tuned yet; "
                                    "run it once before capturing a CUDA graph")
            _tuned_keys.add(key)
        _tuned_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]), cdiv(m, meta["BLOCK_M"]))](
            *args, **flags, M_BUCKET=bucket)
        return out
    c = config or INTERPRET_CONFIG
    block_m = max(16, min(c.block_m, next_pow2(m)))
    _dot_kernel[(cdiv(n, c.block_n), cdiv(m, block_m))](
        *args, **flags, M_BUCKET=_m_bucket(m), BLOCK_N=c.block_n, BLOCK_M=block_m, BLOCK_W=c.block_w,
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out


DEQUANT_BLOCK_N = 16
DEQUANT_BLOCK_W = 64


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight [N, K] in `dtype` (one pass over the codes; a Triton kernel on CUDA, the
    torch reference elsewhere when Triton is not interpreting)."""
    n, k = qw.out_features, qw.in_features
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=qw.data.device)
    if n == 0 or k == 0:
        return out
    fmt = _FORMATS[qw.qtype]
    kw = cdiv(k, 4) if qw.qtype == "fp8" else qw.data.shape[1]
    vec = 32 if qw.qtype == "int4" else 16
    c0, c1 = _unpack_constants(qw.qtype)
    _dequant_kernel[(cdiv(n, DEQUANT_BLOCK_N), cdiv(kw, DEQUANT_BLOCK_W))](
        qw.data, qw.scales, qw.biases if qw.biases is not None else qw.scales, out, n, k, kw,
        qw.data.stride(0), qw.scales.stride(0), c0, c1, FORMAT=fmt,
        VECS_PER_GROUP=max(1, qw.group_size // vec), BLOCK_N=DEQUANT_BLOCK_N, BLOCK_W=DEQUANT_BLOCK_W)
    return out


def dequant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Large M: dequantize into a transient bf16/fp16 weight, then cuBLAS."""
    return torch.nn.functional.linear(x, dequantize_weight(qw, x.dtype), None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- fp8 tensor cores


@triton.jit
def _quant_rows_fp8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """Row m of x -> e4m3 with one fp32 scale (amax / 448)."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + m * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + m * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = tl.clamp(v / scale, -448.0, 448.0)
        tl.store(q_ptr + m * stride_qm + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


QUANT_ROWS_BLOCK_K = 1024


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as e4m3 [M, K], per-row fp32 scales [M, 1]); Triton on CUDA, torch elsewhere."""
    m, k = x.shape
    if not x.is_cuda:
        scale = (x.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_FP8_SCALE)
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_fp8_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                                     BLOCK_K=min(QUANT_ROWS_BLOCK_K, next_pow2(k)))
    return q, scale


SCALED_MM_ALIGN = 16  # torch._scaled_mm wants both of the weight's dimensions a multiple of this
FP8_MMA_CAPABILITY = (8, 9)  # torch._scaled_mm's fp8 GEMM


def scaled_mm_fits(qw: QuantizedWeight) -> bool:
    """Whether an fp8 weight's shape suits torch._scaled_mm (else dequantize + cuBLAS)."""
    return qw.qtype == "fp8" and qw.out_features % SCALED_MM_ALIGN == 0 and qw.in_features % SCALED_MM_ALIGN == 0


def large_m_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows past the Triton kernels: fp8 tensor cores where the weight and device allow, else
    dequantize + cuBLAS."""
    if scaled_mm_fits(qw) and x.is_cuda and torch.cuda.get_device_capability(x.device) >= FP8_MMA_CAPABILITY:
        return scaled_mm_fp8(x, qw, bias)
    return dequant_linear(x, qw, bias)


def scaled_mm_fp8(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W^T on the fp8 tensor cores: x quantized per row (dynamic), W per channel (W8A8)."""
    xq, xs = quantize_rows_fp8(x)  # [M, K], [M, 1]
    out = torch._scaled_mm(xq, qw.data.t(), scale_a=xs, scale_b=qw.scales.view(1, -1).float(),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out
