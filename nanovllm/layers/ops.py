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


def _fp32_rms_norm_op(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's own rms_norm computes the reference's values: in fp32 on the CPU it does
    (normalise in fp32, then scale; tests/layers/test_ops_cpu.py checks) in one op instead of
    eight, which counts at batch-1 decode where each op costs more dispatch than work."""
    return x.dtype == torch.float32 and weight.dtype == torch.float32 and not x.is_cuda


def rms_norm(x, weight, eps, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.rms_norm(x, weight, eps, pdl=options.pdl)
    if _fp32_rms_norm_op(x, weight):
        return torch.rms_norm(x, weight.shape, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps, options: KernelOptions = DEFAULT_KERNEL_OPTIONS):
    if use_triton(x, options):
        from nanovllm.kernels import rmsnorm

        return rmsnorm.fused_add_rms_norm(x, residual, weight, eps, pdl=options.pdl)
    if _fp32_rms_norm_op(x, weight) and residual.dtype == torch.float32:
        new_residual = x + residual  # [T, hidden]
        return torch.rms_norm(new_residual, weight.shape, weight, eps), new_residual
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
