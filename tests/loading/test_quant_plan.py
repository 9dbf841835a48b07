"""plan_quantization under tensor parallelism: quantized layers do not shard, so a GGUF is
dequantized at load (as before quantized layers existed) and everything that needs quantized
layers is refused with a ValueError saying what to change."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from nanovllm.loading import model_info as model_info_lib
from nanovllm.models.registry import resolve_model_class
from nanovllm.loading.quant_plan import plan_quantization
from nanovllm.loading.resolve import resolve_model

from loading.test_gguf_loader import write_tiny_model


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    path, _ = write_tiny_model(tmp_path_factory.mktemp("plan") / "tiny-q8.gguf", "llama", QT.Q8_0)
    source = resolve_model(str(path))
    hf_config = model_info_lib.load_hf_config(source)
    with torch.device("meta"):
        model = resolve_model_class(hf_config)(hf_config, 128)
    return model, source, hf_config


def test_gguf_blocks_stay_quantized_on_one_rank_and_are_dequantized_on_several(q8_gguf):
    model, source, hf_config = q8_gguf
    one = plan_quantization(model, source, hf_config, None, device_type="cpu")
    assert one.gguf_codes and one.qtypes == {"int8"}  # Q8_0 kept as int8
    two = plan_quantization(model, source, hf_config, None, device_type="cpu", tp_size=2)
    assert not two.specs and not two.gguf_codes


@pytest.mark.parametrize("quantization", ["int8", "int4", "fp8"])
def test_quantization_at_two_ranks_is_refused(q8_gguf, quantization):
    model, source, hf_config = q8_gguf
    with pytest.raises(ValueError, match=f"quantization='{quantization}' needs tensor_parallel_size=1"):
        plan_quantization(model, source, hf_config, quantization, device_type="cpu", tp_size=2)


def test_gguf_blocks_on_a_gpu_stay_quantized_only_when_asked(q8_gguf):
    model, source, hf_config = q8_gguf
    default = plan_quantization(model, source, hf_config, None, device_type="cuda")
    assert not default.specs and not default.gguf_codes  # dequantized at load
    asked = plan_quantization(model, source, hf_config, "int8", device_type="cuda")
    assert asked.gguf_codes and asked.qtypes == {"int8"}
