"""Greedy parity with HF transformers (fp32, CPU) for every model family beyond Llama/Qwen:
Mistral with a sliding window, Gemma 2 and 3, GPT-2, Phi-3 (longrope), Qwen3-MoE, Mixtral.

Our engine generates 32 greedy tokens for a batch of prompts of different lengths (longer
than the tiny models' sliding windows; prefill in chunks, small KV blocks). HF then runs one
forward per prompt over prompt + our tokens: greedy decoding is the same sequence exactly
when each of our tokens is HF's argmax given the tokens before it, so this checks HF's own
greedy output in one forward instead of 32 (HF's generate costs ~60 ms a step here). The
top-5 logprobs of every step must match HF's too.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tiny_models import FAMILY_CONFIGS

NUM_TOKENS = 32
TOP_LOGPROBS = 5
LOGPROB_ATOL = 1e-3
PROMPT_LENGTHS = (1, 5, 17, 40)
# Phi-3's longrope switches to its long factors past 64 tokens: sequences stay on one side of
# it, and the long prompt prefills whole (HF recomputes the whole cache when a sequence
# crosses; a chunk that ends below the switch rotates with the short factors: layers/rotary.py)
PROMPT_LENGTHS_OF = {"phi3_longrope": (1, 5, 17, 70)}
BATCHED_TOKENS_OF = {"phi3_longrope": 128}


def make_prompts(name: str, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = FAMILY_CONFIGS[name]["vocab_size"]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS_OF.get(name, PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    # HF's eager attention is its reference implementation: some transformers releases (5.17)
    # load Gemma 2 with torch SDPA, which has no soft-cap and silently drops it.
    return lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_greedy_tokens_and_logprobs_match_hf(name, device, tiny_model_factory, hf_model):
    """On CUDA (fp32): the Triton kernels (soft-capped / windowed attention, Gemma norms, GeGLU,
    fused MoE, padded head dims) and the decode CUDA graphs, against HF on the CPU."""
    path = tiny_model_factory(name)
    llm = LLM(path, skip_tokenizer_init=True, device=device, dtype="float32", max_model_len=256, block_size=8,
              max_num_batched_tokens=BATCHED_TOKENS_OF.get(name, 32),  # 40-token prompts prefill in chunks
              max_num_seqs=8)  # few decode graphs to capture on CUDA
    prompts = make_prompts(name)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = hf_model(path)
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0]
        assert len(ours.token_ids) == NUM_TOKENS
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours.token_ids])).logits[0, len(prompt) - 1 : -1]  # [32, V]
        hf_logprobs = torch.log_softmax(logits.float(), dim=-1)
        hf_greedy = hf_logprobs.argmax(dim=-1).tolist()
        assert ours.token_ids == hf_greedy, f"{name}: prompt of {len(prompt)} tokens diverged from HF's greedy choice"
        for step, entry in enumerate(ours.logprobs):
            assert len(entry) >= TOP_LOGPROBS
            for tok, lp in entry.items():
                assert lp.logprob == pytest.approx(hf_logprobs[step, tok].item(), abs=LOGPROB_ATOL), f"step {step}"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "llama",
                                                      "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 32}))
    with pytest.raises(ValueError, match="FalconForCausalLM.*not supported") as err:
        LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu", load_format="dummy")
    for arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "Phi3ForCausalLM",
                 "Qwen3MoeForCausalLM", "MixtralForCausalLM", "MistralForCausalLM"):
        assert arch in str(err.value)


def test_the_torch_free_architecture_list_names_every_registered_model():
    """loading/model_info.py checks a config against models/architectures.py without importing
    torch models; the registry that builds them must hold exactly the same names."""
    from nanovllm.models.architectures import SUPPORTED_ARCHITECTURES
    from nanovllm.models.registry import MODEL_REGISTRY

    assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES), "list a new architecture in models/architectures.py too"
