"""Shared parametrization of the kernel tests.

fp32 runs everywhere; bf16 only on a GPU (the interpreter computes through numpy, which
has no bfloat16). fp16 runs in the CPU interpreter too for the kernels whose fp16 path
passes there (`PRECISIONS_CPU_FP16`); the others keep it GPU-only (`PRECISIONS`).
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

PRECISIONS = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16", marks=GPU),
    pytest.param(torch.float16, id="fp16", marks=GPU),
]
PRECISIONS_CPU_FP16 = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16", marks=GPU),
    pytest.param(torch.float16, id="fp16"),
]


def large_shapes(dtype: torch.dtype) -> bool:
    """Whether a case uses its GPU-sized shapes: 16-bit dtypes on a GPU. The interpreter runs
    every dtype at the small fp32 shapes (the larger ones take minutes there)."""
    return HAS_CUDA and dtype != torch.float32
