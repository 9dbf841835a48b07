"""L2 prefetch of the next GEMM's weight from a low-traffic kernel (Hopper's bulk prefetch).

Why. A batch-1 decode step alternates weight-streaming GEMVs with kernels that move little
data: RoPE + KV store (~3 us per layer) and decode attention (~7 us per layer on Qwen3-8B,
~2.6 MB of KV), during which HBM mostly idles. The decode attention kernel knows what comes
next: o_proj, whose weight (33.5 MB on the 8B: ~7.6 us at 4.4 TB/s, about one attention
kernel) no kernel writes. So, before its PDL wait (it is then running ahead, during RoPE),
it asks the L2 to fetch the start of that weight (`cp.async.bulk.prefetch.L2.global`: one
instruction per piece, no registers held, nothing to wait for); o_proj's own loads then hit
L2. (Prefetching from a GEMV for its own weight, during the kernel before it, was measured
and lost: see docs/performance.md; there the kernel before streams weights too, and the
prefetch only competes with it.)

Which bytes. The first `plan.programs` programs of the prefetching kernel (a linear program
index below `programs`) each ask for `L2_PREFETCH_LANES` consecutive pieces of `piece_bytes`,
so that together they cover a prefix of the weight: all of it, or `L2_PREFETCH_FRACTION` of
the L2 if the weight is larger (the lines must still be there when the GEMV reaches them).
The weight must be one contiguous block.

It reads only weights, so it may run before `pdl_wait` (kernels/pdl.py's contract). Used
only with PDL (without it nothing runs early). Needs sm_90 (bulk async copies); off on older
GPUs, CPU tensors, under TRITON_INTERPRET and with `NANOVLLM_L2_PREFETCH=0` (A/B timing);
`NANOVLLM_L2_PREFETCH_FRACTION` overrides the share of the L2 (tuning).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

L2_PREFETCH_MIN_CAPABILITY = 9  # cp.async.bulk.prefetch needs sm_90
L2_PREFETCH_LANES = 128  # pieces per prefetching program (one per thread at 4 warps)
L2_PREFETCH_FRACTION = 0.5  # at most this share of the L2 is asked for per weight
BULK_ALIGN_BYTES = 16  # bulk copies move multiples of 16 bytes from 16-byte aligned addresses
MIN_PIECE_BYTES = 128  # below one L2 line per piece the weight is too small to bother
DEFAULT_L2_BYTES = 50 * 2**20  # H100; used when the device does not report its L2 size
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class L2PrefetchPlan(NamedTuple):
    programs: int  # programs that prefetch (pid < programs); 0 = no prefetch
    piece_bytes: int  # bytes per prefetch instruction, a multiple of BULK_ALIGN_BYTES


NO_PREFETCH = L2PrefetchPlan(0, 0)


@functools.lru_cache(maxsize=None)
def device_limits(device_index: int) -> tuple[int, int, int]:
    """(compute capability major, multiprocessor count, L2 bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    l2 = int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return props.major, props.multi_processor_count, l2


def plan_l2_prefetch(weight: torch.Tensor, max_programs: int) -> L2PrefetchPlan:
    """How a kernel launched with `max_programs` programs prefetches `weight`'s prefix on
    the weight's device; NO_PREFETCH where it cannot or should not."""
    if (INTERPRET or not weight.is_cuda or not weight.is_contiguous()
            or weight.data_ptr() % BULK_ALIGN_BYTES or os.environ.get("NANOVLLM_L2_PREFETCH", "1").strip() == "0"):
        return NO_PREFETCH
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    major, sms, l2 = device_limits(index)
    if major < L2_PREFETCH_MIN_CAPABILITY:
        return NO_PREFETCH
    return prefetch_plan(weight.numel() * weight.element_size(), max_programs, sms, l2,
                         _fraction(os.environ.get("NANOVLLM_L2_PREFETCH_FRACTION", "")))


@functools.lru_cache(maxsize=8)
def _fraction(text: str) -> float:
    """NANOVLLM_L2_PREFETCH_FRACTION (a tuning knob for A/B runs), L2_PREFETCH_FRACTION if unset."""
    if not text.strip():
        return L2_PREFETCH_FRACTION
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError(f"NANOVLLM_L2_PREFETCH_FRACTION must be a share of the L2 in (0, 1], got {text!r}")
    return value


def prefetch_plan(nbytes: int, max_programs: int, sms: int, l2_bytes: int,
                  fraction: float = L2_PREFETCH_FRACTION) -> L2PrefetchPlan:
    """The plan for a weight of `nbytes`: one prefetching program per SM (at most
    `max_programs`), pieces covering min(nbytes, fraction * L2) rounded down to whole
    16-byte pieces; NO_PREFETCH if a piece would be smaller than MIN_PIECE_BYTES."""
    programs = min(sms, max_programs)
    if programs < 1:
        return NO_PREFETCH
    wanted = min(nbytes, int(fraction * l2_bytes))
    piece = wanted // (programs * L2_PREFETCH_LANES) // BULK_ALIGN_BYTES * BULK_ALIGN_BYTES
    return L2PrefetchPlan(programs, piece) if piece >= MIN_PIECE_BYTES else NO_PREFETCH


def prefetched_bytes(plan: L2PrefetchPlan) -> int:
    """Bytes of the weight's prefix that the plan asks the L2 for."""
    return plan.programs * L2_PREFETCH_LANES * plan.piece_bytes


@triton.jit
def l2_prefetch(base_ptr, piece_bytes, pid, PROGRAMS: tl.constexpr, LANES: tl.constexpr):
    """Program `pid` (< PROGRAMS) asks the L2 for bytes [pid * LANES * piece, (pid + 1) * LANES * piece)
    of `base_ptr` (one bulk prefetch per lane); PROGRAMS = 0 compiles to nothing."""
    if PROGRAMS > 0:
        if pid < PROGRAMS:
            lane = pid * LANES + tl.arange(0, LANES)  # [LANES] piece indices
            ptrs = base_ptr.to(tl.pointer_type(tl.int8)) + lane.to(tl.int64) * piece_bytes
            sizes = tl.zeros([LANES], dtype=tl.int32) + piece_bytes
            # the asm has no real result; is_pure=False keeps it from being dropped as unused
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                      [ptrs, sizes], dtype=tl.int32, is_pure=False, pack=1)

