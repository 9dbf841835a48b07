"""Triton SiLU-and-mul vs `reference.silu_and_mul`.

CPU: interpreter, fp32 and fp16. GPU: bf16 too (`@pytest.mark.gpu`), 16-bit cases with more rows.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.activation import silu_and_mul

from kernel_params import DEVICE, PRECISIONS_CPU_FP16, large_shapes



@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("shape", [(1, 128), (7, 2 * 1000), (33, 2 * 3072), (2, 5, 2 * 64)])
def test_silu_and_mul_matches_reference(shape, dtype):
    if large_shapes(dtype):
        shape = (shape[0] * 64, *shape[1:])
    gen = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=gen) * 3).to(DEVICE, dtype)
    out = silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_silu_and_mul_strided_input_and_out():
    x = torch.randn(6, 4 * 96, device=DEVICE)[:, : 2 * 96]  # row stride 384, not 192
    out = torch.full((6, 96), float("nan"), device=DEVICE)
    silu_and_mul(x, out=out)
    torch.testing.assert_close(out, reference.silu_and_mul(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(3, 5, device=DEVICE))
