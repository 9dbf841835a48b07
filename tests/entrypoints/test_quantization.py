"""Weight quantization through the engine on CPU: `LLM(quantization=...)` on tiny random models
and pre-quantized GPTQ / AWQ checkpoints, each against an unquantized engine whose weights are
the dequantized ones (same numbers in fp32: only the CPU kernels' bf16 activations differ);
the bundled GGUF kept 4-bit; configuration errors."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import quant_formats as qf
from nanovllm.layers.quantized_linear import QuantizedLinear, quantized_modules

from prequant_checkpoints import write_prequantized, write_reference

PROMPT = {"prompt_token_ids": [3, 17, 42, 7, 99, 5, 61, 8, 23, 11]}
# max |logprob difference| over the prompt's tokens, quantized engine vs fp32 engine on the
# dequantized weights: bf16 activations in the CPU int4 / int8 GEMMs (fp8 runs fp32 activations)
LOGPROB_TOL = {"int8": 0.05, "int4": 0.05, "fp8": 0.02}


def prompt_logprobs(llm) -> torch.Tensor:
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids = PROMPT["prompt_token_ids"]
    return torch.tensor([e[t].logprob for t, e in zip(ids[1:], out.prompt_logprobs[1:])])


def engine(path, **kwargs):
    return LLM(path, device="cpu", skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=16, **kwargs)


@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_quantization_at_load_matches_the_dequantized_model(tiny_model_factory, tmp_path, qtype):
    src = tiny_model_factory("qwen2")  # biases on q/k/v, K = 64 and 96: int4 groups of 64 and 32
    ref_dir = write_reference(src, str(tmp_path / "ref"),
                              lambda name, w: qf.dequantize(qf.quantize(w.float(), qtype)).to(w.dtype))
    quant = engine(src, quantization=qtype)
    layers = quantized_modules(quant.engine.executor.worker.model)
    info = quant.engine.executor.info
    assert info.quantization.startswith(qtype) and len(layers) == 8 and "lm_head" not in layers
    assert info.param_bytes < info.param_bytes_unquantized
    got, want = prompt_logprobs(quant), prompt_logprobs(engine(ref_dir))
    assert (got - want).abs().max() < LOGPROB_TOL[qtype]
    unquantized = prompt_logprobs(engine(src))
    assert (got - unquantized).abs().max() > 1e-4  # the weights really changed


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("gptq", True), ("awq", False)],
                         ids=["gptq", "gptq_act_order", "awq"])
def test_prequantized_checkpoints_run_quantized(tiny_model_factory, tmp_path, method, act_order):
    src = tiny_model_factory("qwen2")
    qdir = str(tmp_path / method)
    expected = write_prequantized(src, qdir, method, group_size=32, act_order=act_order)
    ref_dir = write_reference(src, str(tmp_path / "ref"), lambda name, w: expected[name[: -len(".weight")]])
    quant = engine(qdir)
    assert quant.engine.executor.info.quantization.startswith("int4 g32")
    got, want = prompt_logprobs(quant), prompt_logprobs(engine(ref_dir))
    assert (got - want).abs().max() < LOGPROB_TOL["int4"]
    with pytest.raises(ValueError, match="already quantized"):
        engine(qdir, quantization="int8")


def test_bundled_gguf_decodes_from_its_4bit_weights():
    default = LLM(device="cpu", max_model_len=256)
    info = default.engine.executor.info
    assert "int4 g32: 120 layers" in info.quantization and "int8 g32: 1 layer" in info.quantization  # Q8_0 head
    assert not info.cpu_fp16_weights
    reference = LLM(device="cpu", max_model_len=256, cpu_weight_format="fp32")  # dequantized, as before
    assert reference.engine.executor.info.quantization == ""
    # memory report: the tied head counts once unquantized; 4-bit decoder + fp32 embedding < half
    assert info.param_bytes_unquantized == reference.engine.executor.info.param_bytes
    assert info.param_bytes < 0.5 * info.param_bytes_unquantized
    params = SamplingParams(temperature=0, max_tokens=8)
    prompt = "The capital of France is"
    a = default.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    b = reference.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    assert "Paris" in a and a.split()[0] == b.split()[0]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(quantization="int3"), ValueError, "not supported"),
    (dict(quantization=8), TypeError, "string"),
    (dict(quantize_lm_head=True), ValueError, "needs quantization"),
])
def test_bad_quantization_settings(kwargs, error, match):
    from nanovllm.config import EngineConfig

    with pytest.raises(error, match=match):
        EngineConfig(**kwargs)
    assert EngineConfig(quantization="W4A16").quantization == "int4"
    assert EngineConfig(quantization="none").quantization is None


def test_quantize_lm_head(tiny_model_factory):
    path = tiny_model_factory("llama")  # 2 decoder layers: qkv, o, gate_up, down each
    assert engine(path, quantization="int8").engine.executor.info.quantization == "int8: 8 layers"
    with_head = engine(path, quantization="int8", quantize_lm_head=True)
    assert with_head.engine.executor.info.quantization == "int8: 9 layers"
    head = with_head.engine.executor.worker.model.lm_head
    assert isinstance(head, QuantizedLinear) and head.lm_head
    assert torch.isfinite(prompt_logprobs(with_head)).all()


def test_cli_quantization_flag_is_validated(capsys):
    """Every engine-building command takes --quantization; a bad value stops argparse with a
    message listing the choices (exit 2), before any model loads."""
    from nanovllm.cli.main import build_parser

    parser = build_parser()
    for argv in (["generate", "hi"], ["chat"], ["serve"], ["bench", "latency", "--model", "m"], ["bench", "throughput", "--model", "m"],
                 ["bench", "perplexity"], ["bench", "prefix", "--model", "m"]):
        assert parser.parse_args(argv + ["--quantization", "INT4"]).quantization == "int4"
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv + ["--quantization", "int3"])
        assert e.value.code == 2
        assert "invalid choice: 'int3'" in capsys.readouterr().err
    args = parser.parse_args(["generate", "hi", "-q", "fp8", "--quantize-lm-head"])
    from nanovllm.cli.args import engine_kwargs

    assert engine_kwargs(args)["quantization"] == "fp8" and engine_kwargs(args)["quantize_lm_head"] is True


def test_latency_memory_report():
    """bench latency's report: bytes freed by quantization, in KV-cache tokens of this model."""
    from nanovllm.bench.latency import memory_report
    from nanovllm.step_io import WorkerInfo

    block, per_token = 16, 144 * 1024  # Qwen3-8B: 36 layers x K,V x 8 heads x 128 x bf16
    info = WorkerInfo(num_kv_blocks=1000, device="cuda:0", dtype="bfloat16", kv_bytes_per_block=block * per_token,
                      param_bytes=6 * 10**9, cuda_graphs=True, cpu_fp16_weights=False,
                      param_bytes_unquantized=16 * 10**9, quantization="int4 g128: 252 layers")
    text, cols = memory_report(info, block)
    assert cols["kv_tokens_gained"] == 10**10 // per_token and cols["weight_bytes_unquantized"] == 16 * 10**9
    assert "10.00 GB freed" in text and f"{10**10 // per_token:,} more KV cache tokens" in text
    text, cols = memory_report(WorkerInfo(1000, "cpu", "float32", 4096, 10**6, False, False), block)
    assert text == "" and cols["kv_tokens_gained"] == 0


@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_bfloat16_model_on_cpu(tiny_model_factory, qtype):
    """bf16 activations into every CPU path (packed int kernels and the fp16 fallbacks, which
    take fp32 only) of a model whose shapes torch's int kernels partly refuse."""
    llm = engine(tiny_model_factory("llama"), dtype="bfloat16", quantization=qtype, quantize_lm_head=True)
    lp = prompt_logprobs(llm)
    assert torch.isfinite(lp).all() and (lp <= 0).all()


@pytest.mark.parametrize("family", ["gpt2", "llama_tied_llama3rope", "qwen3_moe", "gemma2"])
def test_model_families_quantize_with_their_head(tiny_model_factory, family):
    """Remapped checkpoints (GPT-2's fused c_attn), heads tied to the embedding, MoE (router and
    experts stay float), soft-capped Gemma: int8 with the head quantized stays close to float."""
    path = tiny_model_factory(family)
    quant = engine(path, quantization="int8", quantize_lm_head=True)
    model = quant.engine.executor.worker.model
    layers = quantized_modules(model)
    assert "lm_head" in layers and all(m.loaded for m in layers.values())
    assert not any(name.endswith(".gate") for name in layers)  # MoE routers stay float
    got, want = prompt_logprobs(quant), prompt_logprobs(engine(path))
    assert (got - want).abs().max() < 0.1
