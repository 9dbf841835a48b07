"""Quantization quality on the bundled SmolLM2-135M: perplexity on a fixed public-domain text
(tests/data/alice_chapter1.txt) against the unquantized model (the GGUF dequantized to fp32).

The default GGUF path keeps the file's own Q4_1 / Q8_0 codes; int8 / fp8 / int4 quantize at
load an fp16 export of the same weights (the path a bf16 / fp16 HF checkpoint takes).
Bounds (docs/quantization.md): int8 within 1%; int4 (round to nearest, groups of 128, 64 where
K = 576) within 5%; fp8 within 3% -- e4m3's 3 mantissa bits cost this small model more than the
issue's 1% target (per-weight rounding noise ~12x int8's).
"""

from __future__ import annotations

import pytest

from nanovllm import LLM
from nanovllm.bench.perplexity import load_text, perplexity, tokenize
from nanovllm.loading.resolve import bundled_model_path

from prequant_checkpoints import export_gguf_as_hf

MAX_TOKENS = 1536  # three windows of 512: a few seconds per model on the CI machine
BOUNDS = {None: 0.01, "int8": 0.01, "fp8": 0.03, "int4": 0.05}


@pytest.fixture(scope="module")
def text_ids():
    llm = LLM(device="cpu", max_model_len=1024, cpu_weight_format="fp32")
    ids = tokenize(llm, load_text(), MAX_TOKENS)
    return ids, perplexity(llm, ids)[0]


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    return export_gguf_as_hf(bundled_model_path(), str(tmp_path_factory.mktemp("smollm2_fp16")))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, "int8", "fp8", "int4"], ids=["gguf_default", "int8", "fp8", "int4"])
def test_quantized_perplexity_stays_close(text_ids, fp16_export, quantization):
    ids, base = text_ids
    if quantization is None:  # the GGUF's Q4_1 codes + Q8_0 head, bf16 inputs to the CPU int GEMMs
        llm = LLM(device="cpu", max_model_len=1024)
    else:
        llm = LLM(fp16_export, device="cpu", max_model_len=1024, skip_tokenizer_init=True,
                  quantization=quantization)
        want = "int4 g128: 30 layers, int4 g64: 90 layers" if quantization == "int4" else f"{quantization}: 120 layers"
        assert llm.engine.executor.info.quantization == want  # K = 576: groups of 64; down_proj (K = 1536): 128
    ppl, n = perplexity(llm, ids)
    assert n > 1000
    assert abs(ppl / base - 1) < BOUNDS[quantization], f"perplexity {ppl:.3f} vs {base:.3f} unquantized"
