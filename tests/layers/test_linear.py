"""Packed projections load their shards; the CPU fp16-weight GEMM matches fp32 closely."""

import pytest
import torch

from nanovllm.layers.linear import Linear, QKVLinear, WeightShapeError, cpu_fp16_gemm_available


def test_qkv_shards_land_in_their_rows():
    layer = QKVLinear(hidden=8, head_dim=4, num_heads=2, num_kv_heads=1, bias=False)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for shard, t in (("q", q), ("k", k), ("v", v)):
        layer.weight.weight_loader(layer.weight, t, shard, name=f"{shard}_proj.weight")
    torch.testing.assert_close(layer.weight.data, torch.cat([q, k, v]))
    with pytest.raises(WeightShapeError, match="k_proj"):
        layer.weight.weight_loader(layer.weight, torch.randn(5, 8), "k", name="k_proj.weight")


@pytest.mark.skipif(not cpu_fp16_gemm_available(), reason="fbgemm fp16 GEMM not in this torch build")
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_packed_gemm_matches_fp32(bias):
    torch.manual_seed(0)
    layer = Linear(96, 40, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_()
    x = torch.randn(5, 96)
    expected = layer(x)
    layer.pack_fp16_for_cpu()
    got = layer(x)
    assert layer.packed_fp16 is not None
    assert (got - expected).norm() / expected.norm() < 2e-3  # fp16 weight rounding only
    assert not torch.equal(got, expected)  # the packed path really ran


def test_engine_packs_only_16bit_checkpoints(tiny_model_factory, bundled_llm):
    from nanovllm import LLM

    fp32 = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    assert not fp32.engine.executor.info.cpu_fp16_weights  # fp32 checkpoint: exact fp32 GEMMs (HF parity)
    # the Q4_1 GGUF keeps its 4-bit codes (layers/quantized_linear.py); explicit "fp16" packs as before
    info = bundled_llm.engine.executor.info
    assert info.quantization.startswith("int4 g32") and not info.cpu_fp16_weights
