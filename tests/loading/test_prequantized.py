"""Pre-quantized checkpoints read as codes: GPTQ (v1 / v2, act-order) and AWQ from tiny
checkpoints written by tests/prequant_checkpoints.py, and GGUF blocks against the gguf
package's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from nanovllm.kernels import quant_formats as qf
from nanovllm.loading import gguf_quant
from nanovllm.loading.gptq_awq import (QuantizedLinearSource, group_quantized_tensors, parse_quantization_config)
from nanovllm.loading.safetensors_loader import iter_safetensors

from prequant_checkpoints import write_prequantized


def _read(path):
    from transformers import AutoConfig

    cfg = parse_quantization_config(AutoConfig.from_pretrained(path))
    return cfg, dict((name, t) for name, t, _ in group_quantized_tensors(iter_safetensors(path), cfg))


@pytest.mark.parametrize("method,act_order,v1", [("gptq", False, True), ("gptq", False, False), ("gptq", True, True),
                                                 ("awq", False, False)],
                         ids=["gptq_v1", "gptq_v2", "gptq_act_order", "awq"])
def test_prequantized_checkpoint_unpacks_to_the_written_weights(tiny_model_factory, tmp_path, method, act_order, v1):
    float_dir = tiny_model_factory("qwen2")
    expected = write_prequantized(float_dir, str(tmp_path), method, group_size=32, act_order=act_order, v1=v1)
    cfg, tensors = _read(str(tmp_path))
    assert cfg.method == method and cfg.desc_act == act_order
    float_weights = {name: t.load() for name, t, _ in iter_safetensors(float_dir)}  # lazy: read while open
    for prefix, want in expected.items():
        src = tensors[f"{prefix}.weight"]
        assert isinstance(src, QuantizedLinearSource)
        got = src.codes.dequantize()
        if src.input_perm is not None:  # the layer computes x[:, perm] @ got^T
            unperm = torch.empty_like(got)
            unperm[:, src.input_perm] = got
            got = unperm
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
        w = float_weights[f"{prefix}.weight"].float()
        assert ((got - w).norm() / w.norm()) < 0.15  # int4 RTN of the float weight
        # and the kernels' packing of these codes stands for the same weight (offsets b = -s z
        # rounded to fp16: within 1% of a quantization step)
        packed = src.codes.to_weight()
        step = src.codes.scales.abs().max().item()
        torch.testing.assert_close(qf.dequantize(packed), src.codes.dequantize(), rtol=0, atol=0.01 * step)
    assert (tensors["model.layers.0.self_attn.q_proj.weight"].input_perm is not None) == act_order
    embed = tensors["model.embed_tokens.weight"]  # a float tensor passes through as read (lazy safetensors)
    assert not isinstance(embed, QuantizedLinearSource) and tuple(embed.shape) == tuple(float_weights["model.embed_tokens.weight"].shape)


def test_unsupported_quantization_configs_are_refused():
    class Cfg:
        def __init__(self, qc):
            self.quantization_config = qc

    assert parse_quantization_config(object()) is None
    for qc, match in [({"quant_method": "bitsandbytes"}, "not supported"),
                      ({"quant_method": "gptq", "bits": 3}, "3 bits"),
                      ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv"),
                      ({"quant_method": "gptq", "bits": 8, "sym": False}, "sym"),
                      ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin")]:
        with pytest.raises(ValueError, match=match):
            parse_quantization_config(Cfg(qc))


def test_missing_quantized_parts_are_named(tiny_model_factory, tmp_path):
    float_dir = tiny_model_factory("qwen2")
    write_prequantized(float_dir, str(tmp_path), "awq", group_size=32)
    from transformers import AutoConfig

    cfg = parse_quantization_config(AutoConfig.from_pretrained(str(tmp_path)))
    stream = [(n, t.load(), "f") for n, t, _ in iter_safetensors(str(tmp_path)) if not n.endswith("q_proj.qzeros")]
    with pytest.raises(ValueError, match="q_proj.*lacks qzeros"):
        list(group_quantized_tensors(stream, cfg))


# ----------------------------------------------------------------------------- GGUF blocks


def _random_blocks(qtype, rows, k, seed):
    """Valid random blocks: random bytes with finite, moderate fp16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * k // block, size), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.05, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.Q6_K:
        raw[:, -2:] = scale[:, :2]
    else:
        raw[:, :2] = scale[:, :2]
        if qtype in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K):
            raw[:, 2:4] = scale[:, 2:4]
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K"])
def test_gguf_blocks_read_as_codes_match_gguf_dequantize(qtype):
    qtype = GGMLQuantizationType[qtype]
    rows, k = 6, 512
    raw = _random_blocks(qtype, rows, k, seed=int(qtype))
    codes = gguf_quant.read_quantized(raw, qtype, (rows, k))
    want = torch.from_numpy(gguf_quants.dequantize(raw, qtype))
    torch.testing.assert_close(codes.dequantize(), want, rtol=1e-6, atol=1e-6)
    # packed for the kernels (scales rounded to fp16 where grouped): the same weight
    torch.testing.assert_close(qf.dequantize(codes.to_weight()), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


def test_gguf_quantize_round_trip_q4_0_and_q8_0():
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0):
        raw = gguf_quants.quantize(w, qtype)
        codes = gguf_quant.read_quantized(raw, qtype, w.shape)
        torch.testing.assert_close(codes.dequantize(), torch.from_numpy(gguf_quants.dequantize(raw, qtype)))


def test_types_not_kept_quantized_return_none():
    raw = np.zeros((2, 64 * 4), dtype=np.uint8)
    assert gguf_quant.read_quantized(raw, GGMLQuantizationType.F32, (2, 64)) is None


def test_bundled_model_tensors_kept_quantized_equal_the_dequantized_ones():
    from nanovllm.loading.gguf_loader import read_gguf_checkpoint
    from nanovllm.loading.resolve import bundled_model_path

    ckpt = read_gguf_checkpoint(bundled_model_path())
    floats = ckpt.iter_tensors()
    checked = 0
    for (name, q), (fname, f) in zip(ckpt.iter_tensors(keep_quantized=True), floats):
        assert name == fname
        if isinstance(q, qf.QuantCodes):
            torch.testing.assert_close(q.dequantize(), f, rtol=0, atol=1e-6)
            checked += 1
        if checked >= 12:  # a few layers incl. the llama Q/K row permutation are enough
            break
    assert checked >= 12
