"""Which decode GEMMs run as the Triton skinny GEMM: timed on this GPU, on this model's shapes.

The worker calls `calibrate_gemv` after loading the weights and before the KV cache takes
the free memory and before graph capture. It times cuBLAS against the kernel
(`kernels/gemv.py`) on every distinct Linear weight shape of the model at each row bucket
(1, 2, 4, 8 up to max_m) and returns, per shape, the most rows up to which the kernel wins;
the worker hands that to `layers.linear.set_gemv_rows(model, ...)`. Nothing here is global:
the result belongs to the one model it was measured on.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from nanovllm.kernels import gemv
from nanovllm.layers import ops
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from nanovllm.layers.linear import GemvShape, Linear, gemv_shape
from nanovllm.layers.norm_linear import RMSNormLinear

logger = logging.getLogger(__name__)

# Triton is used up to the largest M below which it is at most this much slower than cuBLAS
# at every timed M; negative: it must be faster by that share. Shapes that the model runs
# after a residual add + RMSNorm (qkv, gate_up) are timed as the layer runs them: the fused
# kernel against the norm kernel + cuBLAS. Why Triton must win clearly: a near tie in these
# isolated timings is not a tie in the decode step. H200, Qwen3-8B gate_up at M = 1 (timings
# within 1% either way): whole-step batch-1 decode 230.4-231.3 tok/s in the five processes
# whose calibration kept cuBLAS, 225.9-226.6 in the two that picked Triton (same run, same
# machine). The clear wins stay Triton's (qkv, o, down and the LM head by 7-12%).
CALIBRATE_MARGIN = -0.03
CALIBRATE_NORM_EPS = 1e-6
ROW_BUCKETS = (1, 2, 4, 8)

# {(N, K, dtype): (cublas_us, triton_us, row_limit)}: times at M = 1, row_limit 0 = cuBLAS
CalibrationResult = dict[GemvShape, tuple[float, float, int]]


def row_limit(ms, cublas_us, triton_us, margin: float = CALIBRATE_MARGIN) -> int:
    """Largest row count up to which Triton takes at most (1 + margin) x cuBLAS's time at every
    timed M (`ms` ascending); 0 = cuBLAS for every M."""
    limit = 0
    for m, c, t in zip(ms, cublas_us, triton_us):
        if t > (1 + margin) * c:
            break
        limit = m
    return limit


def linear_weights(model: torch.nn.Module) -> dict:
    """{(N, K, dtype): (weight, bias, after_norm)} of the first Linear of each distinct weight
    shape on CUDA (one with a bias if any); after_norm: a Linear of that shape runs behind an
    RMSNorm in an `RMSNormLinear` (the decoder's qkv and gate_up projections)."""
    after_norm = {gemv_shape(m.linear) for m in model.modules()
                  if isinstance(m, RMSNormLinear) and m.linear.supports_gemv}  # quantized ones calibrate apart
    shapes: dict = {}
    for module in model.modules():
        if not isinstance(module, Linear) or not module.supports_gemv or module.packed_fp16 is not None:
            continue
        w = module.weight
        if w.dim() != 2 or not w.is_cuda:
            continue
        key = gemv_shape(module)
        if key not in shapes or (shapes[key][1] is None and module.bias is not None):
            shapes[key] = (w.detach(), None if module.bias is None else module.bias.detach())
    return {key: (w, b, key in after_norm) for key, (w, b) in shapes.items()}


def _time_pair(copies: list, bias: Optional[torch.Tensor], m: int, after_norm: bool,
               options: KernelOptions) -> tuple[float, float]:
    """(cuBLAS us, Triton us) per call at M = m, cycling through the weight `copies`; with
    `after_norm`, each path includes the residual add + RMSNorm as the layer runs it (a
    separate norm kernel before cuBLAS; the norm prologue inside the Triton kernel)."""
    w = copies[0]
    k = w.shape[1]
    pdl = options.pdl
    x = torch.randn(m, k, dtype=w.dtype, device=w.device)  # [m, K]
    residual = torch.randn(m, k, dtype=w.dtype, device=w.device)  # [m, K]
    norm_weight = torch.ones(k, dtype=w.dtype, device=w.device)  # [K]
    out = torch.empty(m, w.shape[0], dtype=w.dtype, device=w.device)  # [m, N]

    def run_cublas():
        for wc in copies:
            h = ops.fused_add_rms_norm(x, residual, norm_weight, CALIBRATE_NORM_EPS, options)[0] if after_norm else x
            torch.nn.functional.linear(h, wc, bias)

    def run_triton():
        for wc in copies:
            if after_norm:
                gemv.rms_norm_skinny_gemm(x, residual, norm_weight, CALIBRATE_NORM_EPS, wc, bias, pdl=pdl)
            else:
                gemv.skinny_gemm(x, wc, bias, out=out, pdl=pdl)

    return gemv.time_us(run_cublas, calls=len(copies)), gemv.time_us(run_triton, calls=len(copies))


def _format_shape(key) -> str:
    n, k, dtype = key
    return f"{n}x{k} {str(dtype).replace('torch.', '')}"


@torch.inference_mode()
def calibrate_gemv(model: torch.nn.Module, device, max_m: int = gemv.GEMV_MAX_M, mode: str = "auto",
                   options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> CalibrationResult:
    """Time cuBLAS vs the skinny GEMM on every distinct Linear weight shape of `model` at each
    row bucket up to max_m; a shape's row limit is the largest bucket below which the kernel
    is faster by CALIBRATE_MARGIN at every bucket (on an H100 it wins at 1 row on every Qwen3
    shape but loses at 8 on the wide ones). Returns {(N, K, dtype): (cublas_us, triton_us,
    row_limit)}, times at M = 1; apply it with `row_limits(result)` and `set_gemv_rows`.

    `mode`: "auto" times; "force" enables every shape up to max_m without timing (times nan);
    "off" returns {}. Also {} off CUDA, under the Triton interpreter and with Triton off.
    Call it on CUDA, after loading weights and before CUDA-graph capture (it captures and
    replays its own small graphs, and tunes the kernel for every row bucket up to max_m).
    """
    device = torch.device(device)
    if mode == "off" or device.type != "cuda" or gemv.INTERPRET or not options.triton:
        return {}
    max_m = max(1, min(int(max_m), gemv.GEMV_MAX_M))
    shapes = linear_weights(model)
    results: CalibrationResult = {}
    if mode == "force":
        for key, (w, b, after_norm) in shapes.items():
            gemv.warm_up(w, b, max_m, after_norm, pdl=options.pdl)
            results[key] = (math.nan, math.nan, max_m)
    else:
        l2 = gemv._l2_bytes(device)
        ms = sorted({m for m in ROW_BUCKETS if m < max_m} | {max_m})
        for key, (w, b, after_norm) in shapes.items():
            gemv.warm_up(w, b, max_m, after_norm, pdl=options.pdl)
            copies = [w] + [w.clone() for _ in range(gemv.rotation_copies(w.numel() * w.element_size(), l2) - 1)]
            cublas, triton_ = zip(*(_time_pair(copies, b, m, after_norm, options) for m in ms))
            del copies
            limit = row_limit(ms, cublas, triton_)
            results[key] = (cublas[0], triton_[0], limit)
            logger.info("gemv calibrate %-16s cublas/triton us%s: %s -> triton up to M=%d (M=1 config %s)",
                        _format_shape(key), " (with the RMSNorm before)" if after_norm else "",
                        "  ".join(f"M={m} {c:.1f}/{t:.1f}" for m, c, t in zip(ms, cublas, triton_)), limit,
                        gemv.best_config(1, key[0], key[1]))
        torch.cuda.empty_cache()  # hand the copies' memory back before the KV cache is sized
    if results:
        logger.info("gemv: Triton for %d of %d Linear shapes%s: %s", sum(1 for v in results.values() if v[2]),
                    len(results), " [gemv=force]" if mode == "force" else "",
                    ", ".join(f"{_format_shape(k)} M<={v[2]}"
                              + ("" if math.isnan(v[0]) else f" ({v[0]:.1f}/{v[1]:.1f} us at M=1)")
                              for k, v in results.items()))
    return results


def row_limits(result: CalibrationResult) -> dict[GemvShape, int]:
    """{shape: row limit} of the shapes the kernel serves (the argument of `set_gemv_rows`)."""
    return {key: v[2] for key, v in result.items() if v[2]}
