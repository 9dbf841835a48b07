"""Kernel dispatch: Triton on CUDA tensors, the pure-torch reference everywhere else.

Each op has the same signature in `kernels/reference.py` and in its Triton module, so a
layer calls `ops.X(..., options)` with its `KernelOptions` and the tensor's device picks
the implementation (`options.triton=False` forces the reference: debugging, A/B checks).
"""

from __future__ import annotations

import functools

import torch

from nanovllm.kernels import reference
from nanovllm.layers.kernel_options import DEFAULT_KERNEL_OPTIONS, KernelOptions


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether this process can run Triton kernels on a GPU (a fact of the install, cached)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor, options: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> bool:
    return x.is_cuda and options.triton and triton_available()


def rms_norm(x, weight, eps, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.rms_norm(x, weight, eps, pdl=options.pdl)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps, pdl=options.pdl)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import activation

        return activation.silu_and_mul(x, pdl=options.pdl)
    return reference.silu_and_mul(x)


def gelu_tanh_and_mul(x, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import activation

        return activation.gelu_tanh_and_mul(x, pdl=options.pdl)
    return reference.gelu_tanh_and_mul(x)


def gemma_rms_norm(x, weight, eps, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.rms_norm(x, weight, eps, pdl=options.pdl, unit_offset=True)
    return reference.gemma_rms_norm(x, weight, eps)


def gemma_fused_add_rms_norm(x, residual, weight, eps, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps, pdl=options.pdl, unit_offset=True)
    return reference.gemma_fused_add_rms_norm(x, residual, weight, eps)
