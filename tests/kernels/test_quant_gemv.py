"""Quantized skinny GEMM (kernels/quant_gemv.py) and tensor-core GEMM (kernels/quant_gemm.py)
against the torch reference (kernels/quant_reference.py).

CPU: Triton interpreter, fp32, small awkward shapes, fixed configs. GPU (`gpu` marker): bf16,
every autotune config, the autotuned path on real decode shapes, the dequant and fp8 paths.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import quant_formats as qf
from nanovllm.kernels import quant_gemm, quant_gemv
from nanovllm.kernels.quant_reference import (quant_linear_reference, quant_rms_norm_linear_reference,
                                              quant_silu_mul_linear_reference)

from kernel_params import DEVICE, GPU, HAS_CUDA

QTYPES = ["int8", "int4", "fp8"]
# (N, K, int4 group): N not a multiple of BLOCK_N, K with a partial chunk / padded vector
SHAPES = [(6, 96, 32), (5, 100, 64), (3, 256, 128)]
# relative max error vs the reference: int4 accumulates codes at 1 / 2048 resolution on
# half its planes (quant_gemv); the others are fp32-exact up to summation order
TOL = {"int8": 2e-5, "int4": 4e-4, "fp8": 2e-5}


def gpu_only(fn):
    for mark in reversed(GPU):
        fn = mark(fn)
    return fn


def make_weight(qtype, n, k, group, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    qw = qf.quantize(w, qtype, group) if qtype == "int4" else qf.quantize(w, qtype)
    return qw.to(device)


def rand(*shape, dtype=torch.float32, seed=1, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device, dtype)


def check(out, ref, qtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
        assert err < TOL[qtype], err
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_skinny_matches_reference(qtype, n, k, group, m):
    qw = make_weight(qtype, n, k, group)
    x = rand(m, k)
    bias = rand(n, seed=2)
    for config in (quant_gemv.INTERPRET_CONFIG, quant_gemv.QGemvConfig(1, 2, 1, 1)):
        check(quant_gemv.quant_skinny_gemm(x, qw, bias, config=config), quant_linear_reference(x, qw, bias), qtype)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
def test_skinny_rms_norm_prologue(qtype, with_residual):
    n, k, group = 7, 128, 32
    qw = make_weight(qtype, n, k, group)
    x, residual = rand(2, k, seed=3), (rand(2, k, seed=4) if with_residual else None)
    g = rand(k, seed=5)
    out, res = quant_gemv.quant_rms_norm_skinny_gemm(x, residual, g, 1e-6, qw)
    ref, ref_res = quant_rms_norm_linear_reference(x, residual, g, 1e-6, qw)
    check(out, ref, qtype)
    torch.testing.assert_close(res, ref_res)


@pytest.mark.parametrize("qtype", QTYPES)
def test_skinny_silu_mul_prologue(qtype):
    n, k, group = 5, 96, 32
    qw = make_weight(qtype, n, k, group)
    x = rand(3, 2 * k, seed=6)
    check(quant_gemv.quant_silu_mul_skinny_gemm(x, qw), quant_silu_mul_linear_reference(x, qw), qtype)


def test_skinny_argument_errors():
    qw = make_weight("int8", 4, 64, 32)
    with pytest.raises(ValueError, match="features"):
        quant_gemv.quant_skinny_gemm(rand(1, 32), qw)
    with pytest.raises(ValueError, match="at most"):
        quant_gemv.quant_skinny_gemm(rand(quant_gemv.QGEMV_MAX_M + 1, 64), qw)
    with pytest.raises(ValueError, match="odd"):
        quant_gemv.quant_silu_mul_skinny_gemm(rand(1, 65), qw)
    assert quant_gemv.quant_skinny_gemm(rand(0, 64), qw).shape == (0, 4)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k,group", [(20, 128, 32), (17, 200, 64)])
@pytest.mark.parametrize("m", [1, 20])
def test_dot_gemm_matches_reference(qtype, n, k, group, m):
    qw = make_weight(qtype, n, k, group)
    x, bias = rand(m, k), rand(n, seed=2)
    check(quant_gemm.quant_dot_gemm(x, qw, bias), quant_linear_reference(x, qw, bias), qtype)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_weight_matches_reference(qtype):
    qw = make_weight(qtype, 9, 200, 64)
    torch.testing.assert_close(quant_gemm.dequantize_weight(qw, torch.float32), qf.dequantize(qw).to(DEVICE))


def test_rows_fp8_quantization_matches_torch_on_cpu():
    x = rand(3, 40)
    q, s = quant_gemm.quantize_rows_fp8(x)
    assert q.dtype == qf.FP8_DTYPE and s.shape == (3, 1)
    assert ((q.float() * s - x).abs().max() / x.abs().max()) < 0.07


# ----------------------------------------------------------------------------- GPU


@gpu_only
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_skinny_every_config_bf16(qtype, m):
    qw = make_weight(qtype, 96, 1024, 128)
    x = rand(m, 1024, dtype=torch.bfloat16)
    ref = quant_linear_reference(x, qw)
    for config in quant_gemv.CONFIGS:
        check(quant_gemv.quant_skinny_gemm(x, qw, config=config), ref, qtype)


@gpu_only
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("m", [1, 16, 64, 200])
def test_dot_every_config_bf16(qtype, m):
    qw = make_weight(qtype, 256, 1024, 128)
    x = rand(m, 1024, dtype=torch.bfloat16)
    ref = quant_linear_reference(x, qw)
    for config in quant_gemm.CONFIGS:
        check(quant_gemm.quant_dot_gemm(x, qw, config=config), ref, qtype)


@gpu_only
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 12288), (1024, 3072)])
def test_autotuned_decode_shapes(qtype, n, k):
    qw = make_weight(qtype, n, k, 128)
    for m in (1, 4, 32):
        x = rand(m, k, dtype=torch.bfloat16)
        ref = quant_linear_reference(x, qw)
        if m <= quant_gemv.QGEMV_MAX_M:
            check(quant_gemv.quant_skinny_gemm(x, qw), ref, qtype)
        check(quant_gemm.quant_dot_gemm(x, qw), ref, qtype)
        check(quant_gemm.dequant_linear(x, qw), ref, qtype)


@gpu_only
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="fp8 tensor cores: sm_90+")
def test_scaled_mm_fp8_close_to_weight_only():
    qw = make_weight("fp8", 512, 1024, 128)
    x = rand(300, 1024, dtype=torch.bfloat16)
    ref = quant_linear_reference(x, qw).float()
    out = quant_gemm.scaled_mm_fp8(x, qw).float()
    assert ((out - ref).norm() / ref.norm()) < 0.05  # activations quantized to e4m3 per row
