"""QuantizedLinear: loading shards in every source form, the path each row count takes, the
fused norm / SiLU prologues, the CPU packed formats; against the dequantized weight in fp32.

The Triton paths run on CPU through the interpreter (`KernelOptions.gemv_on_cpu`), in fp32.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import quant_formats as qf
from nanovllm.kernels.reference import fused_add_rms_norm, silu_and_mul
from nanovllm.layers.kernel_options import KernelOptions
from nanovllm.layers.linear import GateUpLinear, Linear, LMHead, QKVLinear
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.norm_linear import RMSNormLinear, SiluMulLinear
from nanovllm.layers.quantized_cpu import cpu_quant_ops_available
from nanovllm.layers.quantized_linear import LinearQuantSpec, QuantizedLinear, quantize_modules, weight_bytes

TRITON_ON_CPU = KernelOptions(gemv_on_cpu=True)
SPECS = [LinearQuantSpec("int8"), LinearQuantSpec("int4", 32), LinearQuantSpec("fp8")]
SPEC_IDS = ["int8", "int4", "fp8"]
# relative error of the whole output vs the dequantized weight in fp32: kernels (fp32 exact
# up to summation order; int4 ~1e-4), CPU packed kernels (bf16 activations and scales)
TRITON_TOL, CPU_TOL = 2e-3, 3e-2


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def quantized(base: Linear, spec, options=None, weights=None):
    """A QuantizedLinear for `base`, loaded shard by shard from float weights."""
    if options is not None:
        base.kernel_options = options
    layer = QuantizedLinear(base, spec)
    weights = weights or {s: rand(rows, base.in_features, seed=7 + i, scale=base.in_features**-0.5)
                          for i, (s, (_, rows)) in enumerate(layer.shard_offsets.items())}
    for shard, w in weights.items():
        layer.load_weight(layer.weight, w, shard, name=f"w.{shard}")
    parts = [weights[s] for s in layer.shard_offsets]
    return layer, (torch.cat(parts) if all(isinstance(p, torch.Tensor) for p in parts) else None)


def reference_weight(w, spec):
    if spec.qtype == "int4":
        return qf.quantize_int4_codes(w, spec.group_size).dequantize()
    if spec.qtype == "int8":
        return qf.quantize_int8_codes(w).dequantize()
    return qf.dequantize(qf.quantize_fp8(w))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("rows", [1, 3, 24], ids=["skinny", "skinny3", "dot"])
def test_packed_qkv_every_path_matches_the_dequantized_weight(spec, rows):
    base = QKVLinear(64, 16, 4, 2, bias=True)
    base.bias.data.copy_(rand(base.out_features, seed=3))
    layer, w = quantized(base, spec, TRITON_ON_CPU)
    assert layer.loaded and layer.qweight is not None and layer.qweight.out_features == 128
    x = rand(rows, 64, seed=1)
    ref = x @ reference_weight(w, spec).t() + base.bias
    layer.set_row_limits(skinny_rows=4, dot_rows=16)  # 1, 3: skinny; 24: large (dequant + matmul)
    assert rel_err(layer(x), ref) < TRITON_TOL
    layer.set_row_limits(skinny_rows=0, dot_rows=64)  # every row count through the tensor-core kernel
    assert rel_err(layer(x), ref) < TRITON_TOL


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["first_layer", "residual"])
def test_norm_prologue_runs_in_the_skinny_kernel(spec, with_residual, monkeypatch):
    base = GateUpLinear(64, 48)
    layer, w = quantized(base, spec, TRITON_ON_CPU)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data.copy_(1 + 0.1 * rand(64, seed=5))
    norm.kernel_options = TRITON_ON_CPU
    wrapper = RMSNormLinear(norm, Linear(64, 96))
    wrapper.rewire(layer)
    x, residual = rand(2, 64, seed=2), (rand(2, 64, seed=4) if with_residual else None)
    calls = []
    from nanovllm.kernels import quant_gemv

    original = quant_gemv.quant_rms_norm_skinny_gemm
    monkeypatch.setattr(quant_gemv, "quant_rms_norm_skinny_gemm", lambda *a, **k: calls.append(1) or original(*a, **k))
    out, new_residual = wrapper(x, residual)
    assert calls, "the norm did not run inside the skinny kernel"
    h = x if residual is None else x + residual
    hn = fused_add_rms_norm(h, torch.zeros_like(h), norm.weight, 1e-6)[0]
    assert rel_err(out, hn @ reference_weight(w, spec).t()) < TRITON_TOL
    torch.testing.assert_close(new_residual, h)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_silu_mul_input_fused_and_unfused(spec):
    layer, w = quantized(SiluMulLinear(48, 64), spec, TRITON_ON_CPU)
    assert layer.silu_input
    x = rand(2, 96, seed=6)
    ref = silu_and_mul(x) @ reference_weight(w, spec).t()
    assert rel_err(layer(x), ref) < TRITON_TOL  # skinny, SiLU folded in
    layer.set_row_limits(0, 0)
    assert rel_err(layer(x), ref) < TRITON_TOL  # SiLU kernel, then dequant + matmul


def test_lm_head_selects_rows_and_torch_path_without_triton():
    layer, w = quantized(LMHead(64, 200), LinearQuantSpec("int8"), KernelOptions(gemv_on_cpu=True, triton=False))
    hidden = rand(5, 64, seed=8)
    idx = torch.tensor([4, 1])
    out = layer(hidden, idx)
    assert out.shape == (2, 200)
    assert rel_err(out, hidden[idx] @ reference_weight(w, LinearQuantSpec("int8")).t()) < 1e-5


@pytest.mark.skipif(not cpu_quant_ops_available(), reason="torch without the CPU int4/int8 kernels")
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_cpu_packed_formats(spec):
    layer, w = quantized(QKVLinear(64, 16, 4, 2, bias=False), spec)
    assert layer.qweight is None and (layer.cpu_weight is not None or layer.packed_fp16 is not None)
    x = rand(3, 64, seed=9)
    assert rel_err(layer(x), x @ reference_weight(w, spec).t()) < CPU_TOL
    bf16_bytes = 128 * 64 * 2
    if spec.qtype == "fp8":  # no CPU fp8 kernel: fp16 copies of the e4m3 values
        assert layer.packed_fp16 is not None and weight_bytes(torch.nn.Sequential(layer)) == bf16_bytes
    else:
        assert weight_bytes(torch.nn.Sequential(layer)) < bf16_bytes / (3 if spec.qtype == "int4" else 1.7)


@pytest.mark.skipif(not cpu_quant_ops_available(), reason="torch without the CPU int4/int8 kernels")
@pytest.mark.parametrize("spec", SPECS[:2], ids=SPEC_IDS[:2])
def test_cpu_packed_rows_do_not_depend_on_the_batch(spec):
    """A row's output has the same bits alone, in a batch of 2 and in one of 15 (a prefill):
    greedy decoding of the same sequence must not change with what runs beside it."""
    layer, _ = quantized(Linear(576, 96), spec)
    x = rand(15, 576, seed=11)  # [15, K]
    whole = layer(x)
    assert torch.equal(layer(x[-2:]), whole[-2:]) and torch.equal(layer(x[-1:]), whole[-1:])


def test_codes_are_kept_regrouped_or_requantized():
    gen_w = rand(32, 64, seed=11, scale=0.1)
    q8 = qf.quantize_int8_codes(gen_w, 32)  # like GGUF Q8_0
    layer, _ = quantized(Linear(64, 32), LinearQuantSpec("int8", 16), TRITON_ON_CPU, weights={None: q8})
    torch.testing.assert_close(qf.dequantize(layer.qweight), q8.dequantize(), rtol=1e-3, atol=1e-4)  # exact regroup
    q4 = qf.quantize_int4_codes(gen_w, 32)
    layer, _ = quantized(Linear(64, 32), LinearQuantSpec("int4", 32), TRITON_ON_CPU, weights={None: q4})
    assert torch.equal(qf.unpack_int4(layer.qweight.data), q4.codes)  # kept as they are
    layer, _ = quantized(Linear(64, 32), LinearQuantSpec("int8"), TRITON_ON_CPU, weights={None: q4})
    assert rel_err(qf.dequantize(layer.qweight), q4.dequantize()) < 0.01  # int4 source requantized to int8


def test_loading_errors_name_the_tensor():
    layer = QuantizedLinear(QKVLinear(64, 16, 4, 2, bias=False), LinearQuantSpec("int8"))
    with pytest.raises(ValueError, match="tensor 'x.q'.*expected shape"):
        layer.load_weight(layer.weight, rand(63, 64), "q", name="x.q")
    with pytest.raises(ValueError, match="unknown shard"):
        layer.load_weight(layer.weight, rand(64, 64), "z", name="x.z")
    with pytest.raises(ValueError, match="not supported"):
        LinearQuantSpec("int2")


class NormBlock(torch.nn.Module):
    """A decoder's shape in small: a norm, the projection behind it (also through the fused
    wrapper) and a plain Linear after."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(64)
        self.proj = GateUpLinear(64, 32)
        self.fused = RMSNormLinear(self.norm, self.proj)
        self.out = Linear(32, 64)


def test_quantize_modules_rewires_norm_wrappers():
    block = NormBlock()
    new = quantize_modules(block, {"proj": LinearQuantSpec("int4", 32)})
    assert block.proj is new["proj"] and block.fused.linear is new["proj"]
    with pytest.raises(ValueError, match="not a linear"):
        quantize_modules(block, {"norm": LinearQuantSpec("int8")})


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_dequant_linear_takes_a_bias_of_another_dtype(spec):
    """The large-M path (dequantize, then cuBLAS) runs bf16 activations against the layer's
    bias as it was loaded (fp32 here): the bias follows the activations."""
    from nanovllm.kernels import quant_gemm

    layer, w = quantized(Linear(64, 32, bias=True), spec, TRITON_ON_CPU)  # keeps the CUDA format
    layer.bias.data.copy_(rand(32, seed=3))
    x = rand(5, 64, seed=1).to(torch.bfloat16)
    out = quant_gemm.dequant_linear(x, layer.qweight, layer.bias.float())
    assert out.dtype == torch.bfloat16
    ref = x.float() @ reference_weight(w, spec).t() + layer.bias.float()
    assert rel_err(out, ref) < CPU_TOL


def test_scaled_mm_only_for_fp8_weights_of_aligned_shapes():
    """torch._scaled_mm refuses dimensions that are not multiples of 16 (e.g. an output of 200):
    those fp8 weights take dequantize + cuBLAS instead."""
    from nanovllm.kernels import quant_gemm

    fits = {(n, k, s.qtype): quant_gemm.scaled_mm_fits(quantized(Linear(k, n), s, TRITON_ON_CPU)[0].qweight)
            for n, k in [(64, 64), (200, 64), (64, 200)] for s in SPECS}
    assert fits[(64, 64, "fp8")] and not fits[(200, 64, "fp8")] and not fits[(64, 200, "fp8")]
    assert not any(v for (n, k, q), v in fits.items() if q != "fp8")


def test_gemv_calibration_skips_quantized_linears_behind_a_norm():
    """The bf16 skinny-GEMM calibration lists the float Linears behind an RMSNorm; a quantized
    one there has no 2-D float weight (and calibrates apart): it must not break the listing."""
    from nanovllm.worker.gemv_calibration import linear_weights

    block = NormBlock()
    quantize_modules(block, {"proj": LinearQuantSpec("fp8")})
    assert linear_weights(block) == {}  # CPU weights are not timed; what matters is no error
