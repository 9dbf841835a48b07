"""Quantized weight formats: packing round trips, quantizer error bounds, validation."""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import quant_formats as qf


def test_int4_pack_is_vector_planar_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 96), generator=gen)
    words = qf.pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (5, 12)
    assert torch.equal(qf.unpack_int4(words).long(), codes)
    # word i of vector v, nibble j holds k = 32 v + 4 j + i
    v, i, j = 2, 3, 5
    word = int(words[1, 4 * v + i]) & 0xFFFFFFFF
    assert (word >> (4 * j)) & 0xF == codes[1, 32 * v + 4 * j + i]


def test_int8_pack_round_trips_signed_codes():
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-128, 128, (3, 48), generator=gen)
    words = qf.pack_int8(codes)
    assert words.shape == (3, 12)
    assert torch.equal(qf.unpack_int8(words).long(), codes)
    word = int(words[2, 4 * 1 + 2]) & 0xFFFFFFFF  # vector 1, word 2, byte 3 -> k = 16 + 12 + 2
    assert ((word >> 24) & 0xFF) == codes[2, 30] & 0xFF


@pytest.mark.parametrize("k", [64, 100, 576])
@pytest.mark.parametrize("qtype,bound", [("int8", 0.012), ("fp8", 0.04), ("int4", 0.12)])
def test_quantizers_stay_within_their_error(qtype, bound, k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(24, k, generator=gen) * 0.05
    qw = qf.quantize(w, qtype)
    assert qw.in_features == k and qw.out_features == 24
    deq = qf.dequantize(qw)
    assert deq.shape == w.shape
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < bound
    assert qw.nbytes() < w.numel() * 2  # smaller than the bf16 weight


def test_int4_group_size_falls_back_to_a_divisor_and_pads_otherwise():
    assert qf.int4_group_size(4096) == 128
    assert qf.int4_group_size(576) == 64
    assert qf.int4_group_size(96) == 32
    qw = qf.quantize_int4(torch.randn(4, 100))  # no divisor: K padded to whole groups
    assert qw.k_padded % qw.group_size == 0 and qw.k_padded >= 100


def test_zero_rows_and_exact_zeros_survive():
    w = torch.zeros(3, 64)
    w[1, 5] = 1.0
    for qtype in qf.QTYPES:
        deq = qf.dequantize(qf.quantize(w, qtype))
        assert torch.isfinite(deq).all()
        assert deq[0].abs().max() == 0 and deq[2].abs().max() == 0
        assert deq[1, 5] == pytest.approx(1.0, rel=0.02)
        assert deq[1, 6] == 0


def test_validate_rejects_inconsistent_tensors():
    qw = qf.quantize_int4(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match="offsets"):
        qf.QuantizedWeight("int4", qw.data, qw.scales, None, 32, 64).validate()
    with pytest.raises(ValueError, match="codes must be int32"):
        qf.QuantizedWeight("int4", qw.data[:, :4], qw.scales, qw.biases, 32, 64).validate()
    with pytest.raises(ValueError, match="not supported"):
        qf.quantize(torch.randn(2, 32), "int3")
