"""Triton skinny GEMM (GEMV for a few rows): `x [M, K] @ W[N, K]^T (+ b) -> [M, N]`, M <= 8,
optionally with the layer's preceding elementwise op folded in as a prologue on x.

Why. A batch-1..8 decode step multiplies a handful of activation rows by every projection
weight: M tiny, N x K large, so the step is pure weight streaming (each weight byte is used
M times, ~1-8 FLOP/byte). On an H100, cuBLAS picks `nvjet ... 64x8` tiles for these shapes
and reaches ~41% of HBM bandwidth. This kernel is built to stream W once, as fast as the
memory system allows:

  * program p owns output columns `[p * BLOCK_N, (p + 1) * BLOCK_N)` for all M rows and
    streams its `[BLOCK_N, K]` slab of W (nn.Linear layout: each W row is contiguous along
    K), BLOCK_K at a time, as 16-byte vectors with all threads side by side along K;
  * BLOCK_N is small (1..8) so that even N = 1024 gives hundreds to a thousand programs:
    every SM holds several, each thread with BLOCK_N (or 2 x BLOCK_N) vectors in flight;
  * the loads of chunk i + 1 are issued before chunk i is multiplied (register double
    buffering by hand: Triton does not software-pipeline loads that feed no tl.dot);
  * the x chunk `[M, BLOCK_K]` is re-read by every program from L2 / L1 (it is tiny and
    hot); W loads are marked evict-first since each byte is read exactly once;
  * W `[1, BLOCK_N, BLOCK_K]` and x `[BLOCK_M, 1, BLOCK_K]` are 3-D tiles with the same
    register layout, so their broadcast product needs no layout conversion (no shared
    memory, no barrier in the loop); each thread sums its own vector's products in fp32
    into `acc [BLOCK_M, BLOCK_N, BLOCK_K / VEC]`, and the one cross-thread reduction runs
    after the K loop; bias added in fp32, one rounding to the output dtype;
  * no split-K, no atomics: one program computes each output element from start to end, so
    results are deterministic for a given config and the launch is a single kernel with
    no host sync (CUDA-graph capturable once tuned).

Prologues. At decode batch sizes every launch costs about as much as a small kernel's work,
so the op in front of each GEMM is folded into it: `rms_norm_skinny_gemm` (residual add +
RMSNorm before qkv and gate_up; the 1 / rms factor is applied to the dot products after the
K loop, since each program streams all of x anyway) and `silu_mul_skinny_gemm` (SiLU-and-mul
before down). Two to three launches fewer per decoder layer.

Tuning. `triton.autotune` over a small config set (`CONFIGS`) keyed on (BLOCK_M, N, K) and
the tensors' dtypes, where BLOCK_M = next_pow2(M) (1, 2, 4 or 8: the decode graphs'
padded batch sizes); `_prune_configs` first drops configs that would spill registers at that
BLOCK_M or whose K chunk far exceeds K. Tuning benchmarks (timing syncs the host), so it must not first happen
inside a CUDA-graph capture: `warm_up` pre-tunes a weight shape for every bucket, and the
engine's eager warm-up runs before each capture do it too. `skinny_gemm` raises
`NotTunedError` rather than tune while the stream is capturing. Under TRITON_INTERPRET
(CPU tests) there is no autotuning: `INTERPRET_CONFIG` is used.

Whether the kernel is used at all is each Linear module's own row limit
(`Linear.gemv_rows`, `nanovllm.layers.linear.set_gemv_rows`), which the worker fills from
`nanovllm.worker.gemv_calibration.calibrate_gemv`: it times this kernel against cuBLAS on the
model's own weight shapes with the helpers at the end of this file (`time_us`,
`rotation_copies`).
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from nanovllm import envs
from nanovllm.kernels.launch_math import cdiv, next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl

logger = logging.getLogger(__name__)

GEMV_MAX_M = 8  # rows handled (decode batch sizes at low concurrency); more rows -> cuBLAS
INTERPRET = envs.triton_interpret()  # triton reads it at decoration, as here

# autotune's own benchmark (ms): short, the candidates differ by microseconds
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25

# timing (worker/gemv_calibration.py, benchmarks)
CALIBRATE_REPS = 20  # timed graph replays per (shape, M, implementation); the median is kept
CALIBRATE_WARMUP_REPLAYS = 3
WARM_UP_NORM_EPS = 1e-6
ROTATE_L2_FACTOR = 2  # rotate over weight copies totalling >= this many L2 sizes
MAX_ROTATE_COPIES = 32
MAX_ROTATE_BYTES = 512 * 2**20  # never allocate more than this for copies of one weight
DEFAULT_L2_BYTES = 50 * 2**20  # H100; used when the device does not report its L2 size


class GemvConfig(NamedTuple):
    block_n: int  # output columns (W rows) per program
    block_k: int  # K elements per loop iteration
    num_warps: int
    num_stages: int


# All configs keep BLOCK_K >= 8 * 32 * num_warps (bf16 / fp16; fp32: 4 * 32 * num_warps), so
# every thread loads one or two 16-byte W vectors per W row per chunk and the x and W tiles
# share one layout. Per thread, block_n * (1 or 2) vectors of the next chunk are in flight.
# Small block_n: more programs for small N (N = 1024 / block_n 1 = 1024 programs on 132
# SMs); larger block_n: fewer, longer-lived programs with more loads in flight each.
# num_stages stays 1: the loads are pipelined by hand in registers (Triton's pipeliner does
# not stage these non-dot loads through shared memory; their TTGIR has no async copies).
CONFIGS = (
    GemvConfig(1, 2048, 8, 1),
    GemvConfig(2, 1024, 4, 1),
    GemvConfig(2, 2048, 4, 1),
    GemvConfig(4, 1024, 4, 1),
    GemvConfig(4, 2048, 4, 1),
    GemvConfig(4, 2048, 8, 1),
    GemvConfig(8, 1024, 4, 1),
    GemvConfig(8, 2048, 8, 1),
)
INTERPRET_CONFIG = GemvConfig(4, 128, 1, 1)  # CPU interpreter: small tiles, several chunks and a K tail
MAX_ACC_PER_THREAD = 32  # prune configs whose BLOCK_M * BLOCK_N * vectors-per-row accumulators exceed this


class NotTunedError(RuntimeError):
    """The autotuner would have to benchmark while a CUDA graph is being captured."""


PROLOGUE_NONE = 0
PROLOGUE_RMS_NORM = 1  # x -> [x + residual ->] RMSNorm(x) * norm_weight, rstd applied after the K loop
PROLOGUE_SILU_MUL = 2  # x = [gate | up] ([M, 2K]) -> silu(gate) * up


@triton.jit
def _input_chunk(
    x_ptrs,  # [BLOCK_M, 1, BLOCK_K] pointers to x[:, k0:k0 + BLOCK_K]
    res_ptrs, res_out_ptrs,  # same layout into residual / residual_out (PROLOGUE_RMS_NORM + HAS_RESIDUAL)
    nw_ptr,  # [K] RMSNorm weight (PROLOGUE_RMS_NORM)
    k0, offs_k, K, store_res,  # store_res [BLOCK_M, 1, 1]: this program writes the new residual rows
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One K chunk of the GEMM's input in fp32 after the prologue, and its rows' sums of
    squares (RMSNorm: the norm's 1 / rms is applied to the dot product at the end, so the
    sums accumulate in the same pass over x)."""
    k_mask = offs_k + k0 < K  # [1, 1, BLOCK_K]
    x = tl.load(x_ptrs + k0, mask=k_mask, other=0.0, eviction_policy="evict_last")
    sq = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if PROLOGUE == 1:
        if HAS_RESIDUAL:
            r = tl.load(res_ptrs + k0, mask=k_mask, other=0.0, eviction_policy="evict_last")
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the new residual, rounded like rmsnorm.py
            tl.store(res_out_ptrs + k0, x, mask=k_mask & store_res)
        xf = x.to(tl.float32)
        sq = tl.sum(xf * xf, axis=2)  # [BLOCK_M, 1]
        g = tl.load(nw_ptr + k0 + offs_k, mask=k_mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        xf = xf * g
    elif PROLOGUE == 2:
        up = tl.load(x_ptrs + K + k0, mask=k_mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        gate = x.to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32)  # silu rounded like activation.py
        xf = (act * up).to(x.dtype).to(tl.float32)
    else:
        xf = x.to(tl.float32)
    return xf, sq


@triton.jit
def _chunk_dot(x, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """[BLOCK_M, BLOCK_N, BLOCK_K // VEC] partial sums of one K chunk, each over VEC
    consecutive k that one thread holds (no cross-thread reduction)."""
    prod = x * w.to(tl.float32)  # [BM, 1, BK] x [1, BN, BK] -> [BM, BN, BK]
    return tl.sum(tl.reshape(prod, [BLOCK_M, BLOCK_N, BLOCK_K // VEC, VEC]), axis=3)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K] ([M, 2K] for PROLOGUE_SILU_MUL), row stride stride_xm, unit column stride
    w_ptr,  # [N, K], row stride stride_wn, unit column stride
    b_ptr,  # [N], read only when HAS_BIAS (else any pointer)
    out_ptr,  # [M, N], row stride stride_om, unit column stride
    nw_ptr,  # [K] RMSNorm weight (PROLOGUE_RMS_NORM)
    res_ptr,  # [M, K] residual, row stride stride_rm (PROLOGUE_RMS_NORM + HAS_RESIDUAL)
    res_out_ptr,  # [M, K] x + residual, row stride stride_rom, written by program 0
    M,
    N,
    K,  # >= 1
    stride_xm,
    stride_wn,
    stride_om,
    stride_rm,
    stride_rom,
    eps,
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,  # PROLOGUE_NONE / _RMS_NORM / _SILU_MUL
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
    VEC: tl.constexpr,  # elements per 16-byte vector of W's dtype (8 for bf16 / fp16, 4 for fp32)
    BLOCK_M: tl.constexpr,  # next_pow2(M) <= GEMV_MAX_M
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= VEC * 32 * num_warps: all threads side by side along K
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rows_n = offs_n % N  # past-the-end columns re-read valid W rows (no load mask); not stored
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)  # padding rows re-read row M-1; not stored
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]  # [1, 1, BLOCK_K]
    # 3-D tiles so that W [1, BN, BK] and x [BM, 1, BK] get the same register layout (16-byte
    # vectors along K, threads side by side along K; N and M rows repeat in registers):
    # the product and its in-thread partial sums then need no layout conversion.
    w_ptrs = w_ptr + (rows_n.to(tl.int64) * stride_wn)[None, :, None] + offs_k  # [1, BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + (rows_m * stride_xm)[:, None, None] + offs_k  # [BLOCK_M, 1, BLOCK_K]
    res_ptrs = res_ptr + (rows_m * stride_rm)[:, None, None] + offs_k
    res_out_ptrs = res_out_ptr + (rows_m * stride_rom)[:, None, None] + offs_k
    store_res = (offs_m < tl.where(pid == 0, M, 0))[:, None, None]  # [BLOCK_M, 1, 1]: program 0's real rows

    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    # Software pipelining by hand, in registers: the loads of chunk i + 1 are issued before
    # chunk i is multiplied, so each thread always has a chunk of W in flight.
    w = tl.load(w_ptrs, mask=offs_k < K, other=0.0, eviction_policy="evict_first")  # chunk 0
    # PDL: the weight chunk above is issued while the previous kernel (which produces x)
    # may still run; x, the residual, the output and the bias are touched only after the wait.
    pdl_wait(USE_PDL)
    for k in range(BLOCK_K, K, BLOCK_K):  # k: start of the next chunk
        w_next = tl.load(w_ptrs + k, mask=(offs_k + k) < K, other=0.0, eviction_policy="evict_first")
        x, sq = _input_chunk(x_ptrs, res_ptrs, res_out_ptrs, nw_ptr, k - BLOCK_K, offs_k, K, store_res,
                             PROLOGUE, HAS_RESIDUAL, BLOCK_M)
        acc += _chunk_dot(x, w, BLOCK_M, BLOCK_N, BLOCK_K, VEC)
        sumsq += sq
        w = w_next
    k_last = (K - 1) // BLOCK_K * BLOCK_K
    x, sq = _input_chunk(x_ptrs, res_ptrs, res_out_ptrs, nw_ptr, k_last, offs_k, K, store_res,
                         PROLOGUE, HAS_RESIDUAL, BLOCK_M)
    acc += _chunk_dot(x, w, BLOCK_M, BLOCK_N, BLOCK_K, VEC)
    sumsq += sq

    out = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]: the one cross-thread reduction
    if PROLOGUE == 1:
        out = out * tl.rsqrt(sumsq / K + eps)  # [BLOCK_M, 1] per row
    if HAS_BIAS:
        out += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]  # [BLOCK_M, BLOCK_N]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _vec(dtype: torch.dtype) -> int:
    return max(1, 16 // dtype.itemsize)  # elements per 16-byte vector


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that need too many accumulator registers at this BLOCK_M, or whose K chunk
    is more than twice the (power-of-two rounded) K; keep at least one."""
    block_m, k = kwargs["BLOCK_M"], named_args["K"]
    vec = kwargs["VEC"]

    def fits(c):
        per_row = max(1, c.kwargs["BLOCK_K"] // (vec * 32 * c.num_warps))  # vectors per W row per thread
        return (block_m * c.kwargs["BLOCK_N"] * per_row <= MAX_ACC_PER_THREAD
                and c.kwargs["BLOCK_K"] < 2 * next_pow2(k))

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _autotuned_kernel():
    configs = [
        triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in CONFIGS
    ]
    key = ["BLOCK_M", "N", "K", "PROLOGUE", "HAS_RESIDUAL"]  # autotune appends the tensor arguments' dtypes
    from triton.testing import do_bench

    bench = functools.partial(do_bench, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS)
    # cache_results: tuned configs persist in triton's cache dir across processes. Older
    # triton versions lack these keywords (TypeError): drop them one by one.
    prune = {"early_config_prune": _prune_configs}
    for extra in (dict(do_bench=bench, cache_results=True), dict(do_bench=bench), {}):
        try:
            return triton.autotune(configs=configs, key=key, prune_configs_by=prune, **extra)(_skinny_gemm_kernel)
        except TypeError:
            if not extra:
                raise


_tuned_kernel = None if INTERPRET else _autotuned_kernel()
_tuned_keys: set = set()  # (BLOCK_M, N, K, prologue, residual, dtypes) the autotuner has seen: launching them needs no benchmark


def _check_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], k: int) -> None:
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}], got {tuple(weight.shape)}")
    if weight.stride(1) != 1 and k > 1:
        raise ValueError("skinny_gemm needs a weight with unit stride along K (copying it per call defeats the point)")
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n}] vector, got {tuple(bias.shape)}")


def check_rows(x: torch.Tensor, max_m: int = GEMV_MAX_M, what: str = "skinny_gemm") -> torch.Tensor:
    """x as a skinny GEMM takes it: 2-D, at most `max_m` rows, unit stride along K."""
    if x.dim() != 2:
        raise ValueError(f"{what} needs a 2-D x [M, K], got {tuple(x.shape)}")
    if x.shape[0] > max_m:
        raise ValueError(f"{what} handles at most {max_m} rows, got {x.shape[0]}")
    return x.contiguous() if x.stride(1) != 1 and x.shape[1] > 1 else x


def _launch(x, weight, bias, out, config, prologue=PROLOGUE_NONE, norm_weight=None, eps=0.0,
            residual=None, residual_out=None, pdl: bool = True) -> None:
    """Launch the kernel on checked operands (m, n, k >= 1); autotuned unless `config`."""
    m, n, k = out.shape[0], weight.shape[0], weight.shape[1]
    block_m, vec = next_pow2(m), _vec(weight.dtype)
    pdl = use_pdl(x, pdl)
    has_res = residual is not None
    res, res_out = (residual, residual_out) if has_res else (x, x)  # placeholders, never touched
    args = (x, weight, weight if bias is None else bias, out, weight if norm_weight is None else norm_weight,
            res, res_out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), res.stride(0), res_out.stride(0),
            float(eps))
    flags = dict(HAS_BIAS=bias is not None, PROLOGUE=prologue, HAS_RESIDUAL=has_res, USE_PDL=pdl, VEC=vec,
                 BLOCK_M=block_m, **pdl_launch_options(pdl))
    if config is None and _tuned_kernel is not None:
        key = (block_m, n, k, prologue, has_res, x.dtype, weight.dtype, None if bias is None else bias.dtype, out.dtype)
        if key not in _tuned_keys:
            if torch.cuda.is_current_stream_capturing():
                raise NotTunedError(f"skinny_gemm shape M<={block_m} N={n} K={k} {x.dtype} (prologue {prologue}) is "
                                    "not tuned yet; call gemv.warm_up (or run it once) before capturing a CUDA graph")
            _tuned_keys.add(key)
        _tuned_kernel[lambda meta: (cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
        return
    c = config or INTERPRET_CONFIG
    _skinny_gemm_kernel[(cdiv(n, c.block_n),)](
        *args, **flags, BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages,
    )


def new_output(x: torch.Tensor, n: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The [M, N] result of a skinny GEMM of x: `out` if it fits (checked), else a new tensor."""
    m = x.shape[0]
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or (out.stride(1) != 1 and n > 1):
        raise ValueError(f"out must be a [{m}, {n}] tensor with unit stride along N")
    return out


def skinny_gemm(
    x: torch.Tensor,  # [M, K], M <= GEMV_MAX_M, unit stride along K
    weight: torch.Tensor,  # [N, K], unit stride along K (nn.Linear layout)
    bias: Optional[torch.Tensor] = None,  # [N]
    out: Optional[torch.Tensor] = None,  # [M, N], unit stride along N
    config: Optional[GemvConfig] = None,  # bypass autotuning (tests, sweeps)
    *,
    pdl: bool = True,  # programmatic dependent launch where the device supports it (kernels/pdl.py)
) -> torch.Tensor:
    """x @ weight^T (+ bias) with fp32 accumulation, returned in x's dtype ([M, N])."""
    x = check_rows(x)
    m, k = x.shape
    _check_weight(weight, bias, k)
    out = new_output(x, weight.shape[0], out)
    if m == 0 or weight.shape[0] == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, out.shape[1])) if bias is not None else out.zero_()
    _launch(x, weight, bias, out, config, pdl=pdl)
    return out


def rms_norm_skinny_gemm(
    x: torch.Tensor,  # [M, K]
    residual: Optional[torch.Tensor],  # [M, K] or None (no add)
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor] = None,  # [N]
    config: Optional[GemvConfig] = None,
    *,
    pdl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x [+ residual]) @ weight^T (+ bias), the new residual) in one kernel.

    The residual-add + RMSNorm that precedes the qkv and gate_up projections, folded into the
    GEMM: each program sums the squares of the x chunks it streams anyway and scales its dot
    products by 1 / rms at the end, so the norm costs no pass and no launch. The new residual
    `x + residual` (rounded to x's dtype, as `rmsnorm.fused_add_rms_norm`) is written by
    program 0 into a new tensor; with `residual=None` the new residual is x itself. Unlike the
    unfused pair, the normalised x is never rounded to x's dtype before the product.
    """
    x = check_rows(x)
    m, k = x.shape
    _check_weight(weight, bias, k)
    if k == 0:
        raise ValueError("rms_norm_skinny_gemm needs at least one feature (K >= 1)")
    if norm_weight.shape != (k,) or norm_weight.stride(0) != 1:
        raise ValueError(f"norm_weight must be a contiguous [{k}] vector, got {tuple(norm_weight.shape)}")
    residual_out = x
    if residual is not None:
        if residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype} with a contiguous last dim")
        residual_out = torch.empty_like(x)
    out = new_output(x, weight.shape[0], None)
    if m and weight.shape[0]:
        _launch(x, weight, bias, out, config, PROLOGUE_RMS_NORM, norm_weight, eps, residual,
                None if residual is None else residual_out, pdl=pdl)
    elif m and residual is not None:  # no output columns: only the residual add
        residual_out.copy_(x + residual)
    return out, residual_out


def silu_mul_skinny_gemm(
    x: torch.Tensor,  # [M, 2K] = [gate | up]
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor] = None,  # [N]
    config: Optional[GemvConfig] = None,
    *,
    pdl: bool = True,
) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T (+ bias) in one kernel: the MLP's activation folded into
    the down projection (rounded as `activation.silu_and_mul` before the product)."""
    x = check_rows(x)
    m, two_k = x.shape
    if two_k % 2:
        raise ValueError(f"silu_mul_skinny_gemm needs x [M, 2K], got an odd last dim {two_k}")
    _check_weight(weight, bias, two_k // 2)
    out = new_output(x, weight.shape[0], None)
    if m and two_k and weight.shape[0]:
        _launch(x, weight, bias, out, config, PROLOGUE_SILU_MUL, pdl=pdl)
    elif m and weight.shape[0]:
        out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    return out


def best_config(m: int, n: int, k: int) -> Optional[str]:
    """The autotuner's pick for a shape already tuned (any dtype), as text; None if not tuned."""
    if _tuned_kernel is None:
        return None
    block_m = next_pow2(m)
    for key, cfg in _tuned_kernel.cache.items():
        if tuple(key[:3]) == (block_m, n, k):
            kw = cfg.kwargs
            return f"n{kw['BLOCK_N']} k{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
    return None


def warm_up(weight: torch.Tensor, bias: Optional[torch.Tensor] = None, max_m: int = GEMV_MAX_M,
            after_norm: bool = False, pdl: bool = True) -> None:
    """Tune (and compile) the kernel for this weight's shape at every row bucket up to max_m
    (1, 2, 4, 8), so that no later call benchmarks, e.g. inside a CUDA-graph capture; with
    `after_norm`, also its residual-add + RMSNorm variant."""
    k = weight.shape[1]
    x = torch.zeros(GEMV_MAX_M, k, dtype=weight.dtype, device=weight.device)
    norm_weight = torch.ones(k, dtype=weight.dtype, device=weight.device)
    buckets = [1 << i for i in range(GEMV_MAX_M.bit_length()) if 1 << i <= min(max_m, GEMV_MAX_M)]
    if max_m > 1 and max_m & (max_m - 1):  # not a power of two: its own bucket
        buckets.append(min(max_m, GEMV_MAX_M))
    for m in buckets:
        skinny_gemm(x[:m], weight, bias, pdl=pdl)
        if after_norm:
            rms_norm_skinny_gemm(x[:m], x[:m], norm_weight, WARM_UP_NORM_EPS, weight, bias, pdl=pdl)


# ----------------------------------------------------------------------------- timing


def _l2_bytes(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_copies(weight_bytes: int, l2_bytes: int) -> int:
    """How many copies of a weight to cycle through so that each read comes from HBM.

    Cycling through copies totalling >= ROTATE_L2_FACTOR x L2 means that between two reads of
    one copy, at least twice the L2 capacity of other weights has streamed through, so the
    copy has (mostly) been evicted, as in a real decode step, where the ~hundreds of MB of
    per-layer weights all differ. This is approximate (L2 replacement is not strict LRU and the
    H100 L2 is two partitions), and matrices above ~L2 / 2 get few or one copy: a single
    50+ MB matrix does not fit in L2 anyway, so the reads of its one copy largely come from
    HBM. The activations x stay L2-resident, as they are in the model.
    """
    want = cdiv(ROTATE_L2_FACTOR * l2_bytes, max(weight_bytes, 1))
    return max(1, min(want, MAX_ROTATE_COPIES, MAX_ROTATE_BYTES // max(weight_bytes, 1)))


def time_us(fn, reps: int = CALIBRATE_REPS, calls: int = 1) -> float:
    """Median GPU microseconds per call of `fn` (which makes `calls` calls), replayed from a
    CUDA graph so host launch cost is excluded (as in the engine's graphed decode step).
    Falls back to an eager loop if capture fails. fn must already be compiled / tuned."""
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as e:  # pragma: no cover - depends on the driver
        logger.warning("gemv calibration: CUDA-graph capture failed (%s); timing eagerly", e)
        run = fn
    for _ in range(CALIBRATE_WARMUP_REPLAYS):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2] * 1e3 / calls
