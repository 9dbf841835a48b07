"""Sliding-window KV memory end to end (tiny Mistral, window 8, fp32 CPU): a generation four
windows long holds a bounded number of KV blocks, fits a pool far smaller than its length,
and still decodes HF's greedy tokens; a model with global layers (Gemma) frees nothing."""

from __future__ import annotations

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.kv_cache_manager import window_blocks_needed
from tiny_models import FAMILY_CONFIGS, WINDOW

BLOCK_SIZE = 4
NUM_BLOCKS = 10  # 40 token slots for generations of 37 and 45 tokens at once
GEN = 4 * WINDOW


def engine(path, async_scheduling: bool, **kw):
    return LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=128,
               block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, max_num_batched_tokens=8,
               async_scheduling=async_scheduling, **kw)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_windowed_generation_holds_bounded_blocks_and_matches_hf(tiny_model_factory, async_scheduling):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("mistral_window")
    llm = engine(path, async_scheduling)
    eng = llm.engine
    assert eng.kv.sliding_window == WINDOW
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, FAMILY_CONFIGS["mistral_window"]["vocab_size"], (n,), generator=g).tolist()
               for n in (5, 13)]
    params = SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), {"prompt_token_ids": p}, params)
    bound = window_blocks_needed(WINDOW, 8, BLOCK_SIZE)  # chunks of <= 8 tokens (the budget)
    most, outputs = 0, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        for rid in eng.kv.req_blocks:
            most = max(most, len(eng.kv.live_blocks_of(rid)))
    assert most <= bound < (13 + GEN) // BLOCK_SIZE
    assert eng.kv.num_free_blocks == NUM_BLOCKS
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        ours = outputs[str(i)]
        assert len(ours) == GEN
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1 : -1]
        assert ours == logits.argmax(-1).tolist(), f"prompt {i} diverged from HF's greedy choice"


def test_model_with_global_layers_keeps_every_block(tiny_model_factory):
    llm = LLM(tiny_model_factory("gemma2"), skip_tokenizer_init=True, device="cpu", dtype="float32",
              max_model_len=128, block_size=BLOCK_SIZE)
    assert llm.engine.executor.info.kv_sliding_window is None and llm.engine.kv.sliding_window is None
