"""Triton RMSNorm and residual-add + RMSNorm, one pass over the rows.

Why. Every decoder layer normalises twice and adds the residual twice. Fusing the add into
the norm reads x and residual once and writes the new residual and the normalised output
once (one launch, three row-sized transfers instead of five or more). The same kernel
serves Qwen3's per-head q/k norm: a 3-D `[tokens, heads, head_dim]` input, possibly a
strided view of the fused qkv buffer, is normalised per `head_dim` row without a copy.

Numerics follow `reference.rms_norm` / HF Llama: the sum of squares and the scaling run
in fp32, the normalised row is cast to the input dtype and only then multiplied by the
weight; the fused variant first rounds `x + residual` to x's dtype (that rounded value is
both the new residual and the norm's input). Output dtype = promote(x, weight), as in the
reference (the same as x for the usual same-dtype weight).

Gemma's variant (`unit_offset=True`, `reference.gemma_rms_norm`) scales by `1 + weight` in
fp32 and rounds once at the end; a constexpr switch of the same kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch_math import cdiv, next_pow2
from nanovllm.kernels.pdl import pdl_launch_options, pdl_wait, use_pdl

TILE_ELEMENTS = 4096  # elements per program: several short rows share one program
MAX_ROWS_PER_PROGRAM = 64


@triton.jit(do_not_specialize=["num_rows"])  # varies every step: no recompiles
def _rms_norm_kernel(
    x_ptr,  # [outer, inner, N] strided (rows = outer * inner)
    res_ptr,  # same shape, only read when HAS_RESIDUAL
    w_ptr,  # [N]
    out_ptr,  # [outer, inner, N] strided
    res_out_ptr,  # same shape, only written when HAS_RESIDUAL
    num_rows,
    inner_rows,
    stride_x_outer, stride_x_inner,
    stride_r_outer, stride_r_inner,
    stride_o_outer, stride_o_inner,
    stride_ro_outer, stride_ro_inner,
    eps,
    N: tl.constexpr,  # features per row
    BLOCK_N: tl.constexpr,  # next_pow2(N)
    ROWS: tl.constexpr,  # rows per program
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels/pdl.py)
    UNIT_OFFSET: tl.constexpr = False,  # Gemma: scale by (1 + w) in fp32, one rounding
):
    pdl_wait(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    outer = rows // inner_rows
    inner = rows % inner_rows
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < N)[None, :]  # [ROWS, BLOCK_N]

    x_off = (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_off = (outer * stride_r_outer + inner * stride_r_inner)[:, None] + cols[None, :]
        r = tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(x_ptr.dtype.element_ty)  # the new residual, rounded to x's dtype
        ro_off = (outer * stride_ro_outer + inner * stride_ro_inner)[:, None] + cols[None, :]
        tl.store(res_out_ptr + ro_off, summed.to(res_out_ptr.dtype.element_ty), mask=mask)
        x = summed.to(tl.float32)

    mean_sq = tl.sum(x * x, 1) / N  # [ROWS]
    normed = x * tl.rsqrt(mean_sq + eps)[:, None]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = w + 1.0
    else:
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    o_off = (outer * stride_o_outer + inner * stride_o_inner)[:, None] + cols[None, :]
    tl.store(out_ptr + o_off, (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rows_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, inner_rows, stride_outer, stride_inner) describing t as [outer, inner, N] rows.

    1-D to 3-D inputs are described by their own strides (no view, no copy: a strided q/k
    slice of the qkv buffer works in place); >3-D ones are flattened to 3-D first.
    """
    dim = t.dim()
    if dim == 2:
        return t, 1, t.stride(0), 0
    if dim == 3:
        return t, t.shape[1], t.stride(0), t.stride(1)
    if dim == 1:
        return t, 1, 0, 0
    t = t.flatten(0, -3)
    return t, t.shape[1], t.stride(0), t.stride(1)


def _launch(x, residual, weight, out, residual_out, eps: float, pdl: bool, unit_offset: bool = False) -> None:
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{n}] vector, got {tuple(weight.shape)}")
    shape = x.shape
    for name, t in (("x", x), ("residual", residual), ("out", out), ("residual_out", residual_out)):
        if t is not None and (t.shape != shape or t.stride(-1) != 1):
            raise ValueError(f"{name} must have x's shape {tuple(shape)} and a contiguous last dim")
    num_rows = x.numel() // n if n else 0
    if num_rows == 0:
        return
    x, inner_rows, sxo, sxi = _rows_view(x)
    out, _, soo, soi = _rows_view(out)
    has_res = residual is not None
    if has_res:
        residual, _, sro, sri = _rows_view(residual)
        residual_out, _, sroo, sroi = _rows_view(residual_out)
    else:  # placeholders, never touched
        residual, sro, sri, residual_out, sroo, sroi = x, sxo, sxi, out, soo, soi
    block_n = next_pow2(n)
    rows = max(1, min(TILE_ELEMENTS // block_n, MAX_ROWS_PER_PROGRAM, next_pow2(num_rows)))
    elements = rows * block_n
    num_warps = 4 if elements <= 4096 else (8 if elements <= 8192 else 16)
    pdl = use_pdl(x, pdl)
    _rms_norm_kernel[(cdiv(num_rows, rows),)](
        x, residual, weight, out, residual_out, num_rows, inner_rows,
        sxo, sxi, sro, sri, soo, soi, sroo, sroi,
        eps, N=n, BLOCK_N=block_n, ROWS=rows, HAS_RESIDUAL=has_res, num_warps=num_warps,
        USE_PDL=pdl, UNIT_OFFSET=unit_offset, **pdl_launch_options(pdl),
    )


def rms_norm(
    x: torch.Tensor,  # [..., N], e.g. [num_tokens, hidden] or [num_tokens, heads, head_dim]
    weight: torch.Tensor,  # [N]
    eps: float,
    out: Optional[torch.Tensor] = None,  # may be x itself (in place)
    *,
    pdl: bool = True,  # programmatic dependent launch where the device supports it (kernels/pdl.py)
    unit_offset: bool = False,  # Gemma: x / rms(x) * (1 + weight), `reference.gemma_rms_norm`
) -> torch.Tensor:
    """x / rms(x) * weight per last-dim row; `reference.rms_norm` numerics."""
    if out is None:
        dtype = x.dtype if weight.dtype == x.dtype or unit_offset else torch.promote_types(x.dtype, weight.dtype)
        out = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    _launch(x, None, weight, out, None, eps, pdl, unit_offset)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    inplace: bool = False,
    *,
    pdl: bool = True,
    unit_offset: bool = False,  # Gemma: `reference.gemma_fused_add_rms_norm`
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual') in one pass.

    `inplace=True` writes the normalised output into x and the new residual into residual
    (and returns those two tensors); it needs weight's dtype to not widen x's.
    """
    if residual.dtype != x.dtype and inplace:
        raise ValueError("inplace fused_add_rms_norm needs x and residual of the same dtype")
    out_dtype = x.dtype if weight.dtype == x.dtype or unit_offset else torch.promote_types(x.dtype, weight.dtype)
    if inplace:
        if out_dtype != x.dtype:
            raise ValueError(f"inplace fused_add_rms_norm: weight dtype {weight.dtype} widens x dtype {x.dtype}")
        out, residual_out = x, residual
    else:
        out = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, residual, weight, out, residual_out, eps, pdl, unit_offset)
    return out, residual_out
