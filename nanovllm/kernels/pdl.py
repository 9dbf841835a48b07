"""Programmatic dependent launch (PDL) for the decode-path Triton kernels (Hopper and newer).

Why. A batch-1 decode step of a small model is ~300 kernels of a few microseconds each;
between two of them the GPU drains the first grid, flushes its writes and only then starts
launching the second: a couple of microseconds per boundary in which no memory traffic
flows, about a third of the step. Launched with PDL, the next kernel's blocks are scheduled
as soon as every block of the running kernel has signalled (`gdc_launch_dependents`); they
do their independent work (index math, loads of weights, which no kernel writes) and then
block in `gdc_wait` until the previous grid has completed and its memory is visible.

The contract every kernel launched with PDL keeps (all checked by reading the kernel):
  * before `pdl_wait`, it writes nothing and reads only data that no kernel of the forward
    writes: weights, constants, and the step's inputs (sequence lengths, block tables,
    positions, cache slots), which host copies and small kernels fill before the forward's
    first kernel. A kernel runs ahead only of the kernel right before it, and only once
    that kernel has passed its own wait, so everything two or more launches back has
    completed and is visible;
  * every program reaches `pdl_wait` (no early exit before it): a grid whose programs all
    left without waiting could complete before its predecessor and so break the chain of
    completions the next kernel's wait relies on;
  * `gdc_launch_dependents` is called right after the wait, so at most one further kernel is
    scheduled ahead (no spinning grids piling up).

Kernels take a `USE_PDL` constexpr and are launched with `**pdl_launch_options(flag)`.
Each kernel wrapper takes `pdl: bool` (the caller's switch: the layers pass their
`KernelOptions.pdl`, which the worker sets from `EngineConfig.pdl`); PDL is then used for
CUDA tensors on compute capability >= 9 when the installed Triton supports it. Under
TRITON_INTERPRET it is off.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nanovllm import envs

PDL_MIN_CAPABILITY = 9  # griddepcontrol needs sm_90
INTERPRET = envs.triton_interpret()


def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return hasattr(tl_cuda, "gdc_wait") and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.lru_cache(maxsize=None)
def _device_supports_pdl(device_index: int) -> bool:
    if INTERPRET or not _triton_has_pdl():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= PDL_MIN_CAPABILITY


def use_pdl(t: torch.Tensor, enabled: bool = True) -> bool:
    """Whether kernels working on `t` are launched with PDL: `enabled` and the device can."""
    if not enabled or not t.is_cuda:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _device_supports_pdl(index)


def pdl_in_effect(enabled: bool = True) -> bool:
    """Whether decode kernels on the current CUDA device launch with PDL (benchmark CSVs)."""
    return torch.cuda.is_available() and use_pdl(torch.empty(0, device="cuda"), enabled)


def pdl_launch_options(enabled: bool) -> dict:
    """Extra launch keywords: `launch_pdl=True` when enabled, nothing otherwise (the CPU
    interpreter and older Triton versions do not know the keyword)."""
    return {"launch_pdl": True} if enabled else {}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous grid (and its writes), then let the next grid be scheduled."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
