"""Which kernel serves a quantized layer at each row count: timed on this GPU, on this model.

A `QuantizedLinear` (layers/quantized_linear.py) runs M <= skinny_rows rows through the
skinny kernel (quant_gemv, the norm / SiLU in front folded in), M <= dot_rows through the
tensor-core kernel (quant_gemm), and larger M through dequantize + cuBLAS (or the fp8 tensor
cores). Where the crossovers sit depends on the format, the shape and the GPU: the skinny
kernel's cost per weight grows with every row of x, int4's unpacking leaves it less room than
int8's, and the tensor-core kernel only loses to cuBLAS when the GEMM becomes compute bound.

So for every distinct (format, N, K, group, op in front) of the model, the worker times the
paths at row buckets 1, 2, 4, 8, 16, ... up to max_rows, as the layer runs them (the norm or
SiLU kernel included where it is not folded in), from CUDA-graph replays cycling through
copies of the weight (`gemv.time_us`, `gemv.rotation_copies`: HBM reads as in a decode step),
and gives each layer of that shape:

    skinny_rows = the largest bucket up to which the skinny kernel is fastest at every bucket
    dot_rows    = the largest bucket up to which the tensor-core kernel beats the large-M path
                  at every bucket past skinny_rows

`mode`: "auto" times; "force" keeps the layers' defaults untimed (tuning the kernels for each
bucket); "off": every call dequantizes and runs cuBLAS (the A/B baseline). Nothing is global:
the limits live on the model's own modules. Call before the KV cache takes the free memory
and before CUDA-graph capture (it tunes every bucket, captures and replays its own graphs).
"""

from __future__ import annotations

import logging
import math

import torch

from nanovllm.kernels import gemv, quant_gemm, quant_gemv
from nanovllm.kernels.quant_formats import QuantizedWeight
from nanovllm.layers import ops
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS, KernelOptions
from nanovllm.layers.norm_linear import RMSNormLinear
from nanovllm.layers.quantized_linear import QuantizedLinear, quantized_modules

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NORM_EPS = 1e-6
SKINNY_MARGIN = 0.0  # the skinny kernel must be at least as fast as the tensor-core one (it also saves a launch)


def _key(module: QuantizedLinear, prologue: str) -> tuple:
    qw = module.qweight
    return (qw.qtype, qw.out_features, qw.in_features, qw.group_size, qw.per_channel, prologue)


def _layers_by_shape(model: torch.nn.Module) -> dict[tuple, list[QuantizedLinear]]:
    behind_norm = {id(m.linear) for m in model.modules() if isinstance(m, RMSNormLinear)}
    groups: dict[tuple, list[QuantizedLinear]] = {}
    for module in quantized_modules(model).values():
        if module.qweight is None or not module.qweight.data.is_cuda:
            continue
        prologue = "norm" if id(module) in behind_norm else "silu" if module.silu_input else "none"
        if module.input_perm is not None:
            prologue = "none"  # act-order layers gather x first; nothing is folded
        groups.setdefault(_key(module, prologue), []).append(module)
    return groups


def _copies(qw: QuantizedWeight, device) -> list[QuantizedWeight]:
    n = gemv.rotation_copies(qw.nbytes(), gemv._l2_bytes(device))
    clone = (lambda t: None if t is None else t.clone())
    return [qw] + [QuantizedWeight(qw.qtype, qw.data.clone(), qw.scales.clone(), clone(qw.biases), qw.group_size,
                                   qw.in_features) for _ in range(n - 1)]


def _runners(copies: list, bias, m: int, prologue: str, options: KernelOptions, device) -> dict:
    """{path: fn} running every copy once at M = m, each path as the layer would."""
    qw = copies[0]
    k, dtype, pdl = qw.in_features, bias.dtype if bias is not None else torch.bfloat16, options.pdl
    dtype = torch.bfloat16 if dtype not in (torch.bfloat16, torch.float16) else dtype
    width = 2 * k if prologue == "silu" else k
    x = torch.randn(m, width, dtype=dtype, device=device)
    residual = torch.randn(m, k, dtype=dtype, device=device)
    norm_weight = torch.ones(k, dtype=dtype, device=device)

    def front():  # the op the layer runs before an unfused GEMM
        if prologue == "norm":
            return ops.fused_add_rms_norm(x, residual, norm_weight, NORM_EPS, options)[0]
        if prologue == "silu":
            return ops.silu_and_mul(x, options)
        return x

    def skinny():
        for c in copies:
            if prologue == "norm":
                quant_gemv.quant_rms_norm_skinny_gemm(x, residual, norm_weight, NORM_EPS, c, bias, pdl=pdl)
            elif prologue == "silu":
                quant_gemv.quant_silu_mul_skinny_gemm(x, c, bias, pdl=pdl)
            else:
                quant_gemv.quant_skinny_gemm(x, c, bias, pdl=pdl)

    def dot():
        for c in copies:
            quant_gemm.quant_dot_gemm(front(), c, bias, pdl=pdl)

    def large():
        for c in copies:
            h = front()
            quant_gemm.large_m_linear(h, c, bias)

    paths = {"dot": dot, "large": large}
    if m <= quant_gemv.QGEMV_MAX_M:
        paths["skinny"] = skinny
    return paths


def choose_limits(ms: list[int], times: dict[int, dict[str, float]]) -> tuple[int, int]:
    """(skinny_rows, dot_rows) from {M: {path: us}} (`ms` ascending)."""
    skinny = 0
    for m in ms:
        t = times[m]
        if "skinny" not in t or t["skinny"] > (1 + SKINNY_MARGIN) * min(t["dot"], t["large"]):
            break
        skinny = m
    dot = skinny
    for m in (m for m in ms if m > skinny):
        if times[m]["dot"] > times[m]["large"]:
            break
        dot = m
    return skinny, dot


@torch.inference_mode()
def calibrate_quantized(model: torch.nn.Module, device, mode: str = "auto",
                        options: KernelOptions = DEFAULT_KERNEL_OPTIONS, max_rows: int = 256) -> dict:
    """Time and set every quantized layer's row limits (module docstring). Returns
    {shape key: (skinny_rows, dot_rows, {M: {path: us}})}; {} when there is nothing to time."""
    device = torch.device(device)
    groups = _layers_by_shape(model)
    if not groups or device.type != "cuda" or quant_gemv.INTERPRET or not options.triton:
        return {}
    if mode == "off":
        for layers in groups.values():
            for layer in layers:
                layer.set_row_limits(0, 0)
        return {key: (0, 0, {}) for key in groups}
    ms = [m for m in ROW_BUCKETS if m <= max(1, max_rows)]
    results = {}
    for key, layers in groups.items():
        qtype, _, _, _, _, prologue = key
        first = layers[0]
        bias = first.bias.detach() if first.bias is not None else None
        if mode == "force":
            skinny_rows = min(first.skinny_rows, quant_gemv.QGEMV_MAX_M)
            times = {}
            copies = [first.qweight]
            for m in ms:  # tune (and compile) every bucket now, not inside a graph capture
                for path, fn in _runners(copies, bias, m, prologue, options, device).items():
                    if path != "large" and (path != "skinny" or m <= skinny_rows):
                        fn()
            limits = (skinny_rows, max(ms))
        else:
            copies = _copies(first.qweight, device)
            times = {}
            for m in ms:
                runners = _runners(copies, bias, m, prologue, options, device)
                times[m] = {path: gemv.time_us(fn, calls=len(copies)) for path, fn in runners.items()}
            del copies
            limits = choose_limits(ms, times)
        for layer in layers:
            layer.set_row_limits(*limits)
        results[key] = (*limits, times)
        logger.info("quantized %s %dx%d g%s (%s before): skinny kernel up to M=%d, tensor-core kernel up to M=%d%s",
                    qtype, key[1], key[2], key[3], prologue, limits[0], limits[1],
                    "" if not times else "; us " + "  ".join(
                        f"M={m} " + "/".join(f"{p} {t:.1f}" for p, t in sorted(times[m].items())) for m in ms[:4]))
    torch.cuda.empty_cache()
    return results
