"""Shared parametrization of the kernel tests: fp32 everywhere, bf16/fp16 on GPU only."""

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
