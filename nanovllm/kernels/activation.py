"""Triton SiLU-and-mul: `[..., 2d] -> silu(x[..., :d]) * x[..., d:]` in one pass (and GeGLU's
gelu_tanh-and-mul, Gemma's MLP, by a constexpr switch of the same kernel).

Why. The MLP's fused gate_up GEMM writes `[tokens, 2 * intermediate]`; unfused, the
activation is a silu kernel, a mul kernel and an intermediate tensor in between. One
kernel reads the row once and writes half of it.

Numerics follow `reference.silu_and_mul` run in the input dtype: silu is computed in fp32
and rounded to the input dtype, then multiplied by `up` (fp32 product, one rounding) -- the
same two roundings torch does for bf16/fp16 inputs. GELU uses the tanh approximation
(`gelu_pytorch_tanh` / `gelu_new`), tanh written with exp so it saturates cleanly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch_math import cdiv, next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl

MAX_BLOCK = 1024  # features of one output row per program
NUM_WARPS = 4
GELU_TANH_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
TANH_SATURATION = tl.constexpr(40.0)  # exp(40) ~ 2e17: no inf in 1 - 2 / (e^x + 1)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [rows, 2 * D] (row stride stride_x)
    out_ptr,  # [rows, D] (row stride stride_o)
    stride_x,
    stride_o,
    D,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
    GELU_TANH: tl.constexpr = False,  # gelu_tanh(gate) * up instead of silu(gate) * up
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        inner = GELU_TANH_C * (gate + GELU_TANH_CUBIC * gate * gate * gate)
        e2 = tl.exp(tl.minimum(2.0 * inner, TANH_SATURATION))  # clamped where tanh is 1.0 in fp32 already
        act = 0.5 * gate * (2.0 - 2.0 / (e2 + 1.0))  # 0.5 x (1 + tanh(inner))
    else:
        act = gate / (1.0 + tl.exp(-gate))  # silu
    act = act.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded like torch
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, *, pdl: bool = True) -> torch.Tensor:
    """[..., 2 * d] -> silu(x[..., :d]) * x[..., d:], shape [..., d], x's dtype (`pdl`: kernels/pdl.py)."""
    return _act_and_mul(x, out, pdl, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, *, pdl: bool = True) -> torch.Tensor:
    """[..., 2 * d] -> gelu_tanh(x[..., :d]) * x[..., d:]: `reference.gelu_tanh_and_mul`'s twin."""
    return _act_and_mul(x, out, pdl, gelu_tanh=True)


def _act_and_mul(x: torch.Tensor, out: torch.Tensor | None, pdl: bool, gelu_tanh: bool) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"the gated activation needs an even last dim, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    if out is None:
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], d) or out.stride(-1) != 1:
        raise ValueError(f"out must be a [..., {d}] tensor with a contiguous last dim")
    x2 = x.reshape(-1, 2 * d)  # [rows, 2d]; a view unless x's leading dims are not flattenable
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o2 = out.view(-1, d) if out.is_contiguous() else None
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    target = o2 if o2 is not None else torch.empty(rows, d, dtype=out.dtype, device=out.device)
    block = min(MAX_BLOCK, next_pow2(d))
    pdl = use_pdl(x2, pdl)
    _silu_and_mul_kernel[(rows, cdiv(d, block))](
        x2, target, x2.stride(0), target.stride(0), d, BLOCK=block, num_warps=NUM_WARPS,
        USE_PDL=pdl, GELU_TANH=gelu_tanh, **pdl_launch_options(pdl),
    )
    if o2 is None:
        out.copy_(target.view(out.shape))
    return out
