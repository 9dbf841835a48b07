"""Greedy parity with HF transformers (fp32, CPU) on tiny random-weight models."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tiny_models import TINY_CONFIGS

NUM_TOKENS = 32
PROMPT_LENGTHS = (1, 5, 17, 40)


def make_prompts(vocab_size: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(path: str, prompt: list[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1) for l in out.logits]  # per step [V]
    return tokens, logprobs


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_tokens_and_logprobs_match_hf(name, tiny_model_factory):
    path = tiny_model_factory(name)
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=256)
    prompts = make_prompts(TINY_CONFIGS[name]["vocab_size"])
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        hf_tokens, hf_logprobs = hf_greedy(path, prompt)
        ours = out.outputs[0]
        assert ours.token_ids == hf_tokens, f"{name}: prompt of {len(prompt)} tokens diverged"
        for step, (tok, entry) in enumerate(zip(ours.token_ids, ours.logprobs)):
            expected = hf_logprobs[step][tok].item()
            assert entry[tok].logprob == pytest.approx(expected, abs=1e-3), f"step {step}"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_with_repetition_penalty_matches_hf(tiny_model_factory, async_scheduling):
    """The penalty reads every token so far (prompt and output): on the worker's own copy of the
    request's history, kept current by the engine's step inputs (also across prefill chunks)."""
    from transformers import AutoModelForCausalLM

    name = "qwen3"
    path = tiny_model_factory(name)
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=256,
              max_num_batched_tokens=16, async_scheduling=async_scheduling)  # 40-token prompts: 3 chunks
    prompts = make_prompts(TINY_CONFIGS[name]["vocab_size"], seed=2)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, repetition_penalty=1.8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=NUM_TOKENS, do_sample=False, repetition_penalty=1.8,
                            pad_token_id=0, eos_token_id=None)
        assert out.outputs[0].token_ids == hf[0, len(prompt):].tolist(), f"prompt of {len(prompt)} tokens diverged"
