"""Triton RMSNorm / fused residual-add RMSNorm vs `reference.rms_norm` / `fused_add_rms_norm`.

CPU: interpreter, fp32 and fp16. GPU: bf16 too (`@pytest.mark.gpu`), 16-bit cases with more rows.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.rmsnorm import fused_add_rms_norm, rms_norm

from kernel_params import DEVICE, PRECISIONS_CPU_FP16, large_shapes

EPS = 1e-6


def rand(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 2 + 0.5).to(DEVICE, dtype)


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # the same steps in the same precisions; rsqrt rounding can move the last ulp
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("shape", [(1, 1024), (7, 1000), (33, 4096), (5, 8, 128), (3, 2, 4, 64)])
def test_rms_norm_matches_reference(shape, dtype):
    if large_shapes(dtype):
        shape = (shape[0] * 64, *shape[1:])
    x = rand(*shape, dtype=dtype, seed=shape[0])
    weight = rand(shape[-1], dtype=dtype, seed=1)
    check(rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
def test_rms_norm_per_head_on_strided_view_in_place(dtype):
    """Qwen3 q-norm: a [tokens, heads, head_dim] view into the fused qkv buffer, normalised in place."""
    tokens, heads, kv_heads, head_dim = 11, 8, 2, 128
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    weight = rand(head_dim, dtype=dtype, seed=4)
    expected = reference.rms_norm(q.clone(), weight, EPS)
    rest = qkv[:, heads * head_dim :].clone()
    out = rms_norm(q, weight, EPS, out=q)
    assert out.data_ptr() == q.data_ptr()
    check(q, expected)
    assert torch.equal(qkv[:, heads * head_dim :], rest)  # k and v untouched


@pytest.mark.parametrize("dtype", PRECISIONS_CPU_FP16)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(1, 1024), (9, 896), (64, 2048)])
def test_fused_add_rms_norm_matches_reference(shape, inplace, dtype):
    if large_shapes(dtype):
        shape = (shape[0] * 32, shape[1])
    x = rand(*shape, dtype=dtype, seed=5)
    residual = rand(*shape, dtype=dtype, seed=6)
    weight = rand(shape[-1], dtype=dtype, seed=7)
    ref_out, ref_res = reference.fused_add_rms_norm(x, residual, weight, EPS)
    out, new_res = fused_add_rms_norm(x, residual, weight, EPS, inplace=inplace)
    if inplace:
        assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == residual.data_ptr()
    check(out, ref_out)
    check(new_res, ref_res)


def test_fp32_weight_promotes_like_reference():
    x = rand(4, 256, dtype=torch.float32, seed=8)
    weight = rand(256, dtype=torch.float32, seed=9)
    check(rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS))
    with pytest.raises(ValueError):
        rms_norm(x, weight[:128], EPS)
