"""Batching is invisible: mixed batches, chunked prefill, preemption and prefix hits change no token."""

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.request import RequestStatus

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory("qwen3")


def make_prompts(n=6, seed=11):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 3, 16, 17, 31, 45][:n]
    return [{"prompt_token_ids": torch.randint(3, 1000, (k,), generator=g).tolist()} for k in lens]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def engine(path, **kw):
    kw.setdefault("max_model_len", 128)
    return LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32", **kw)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_each_prompt_in_a_mixed_batch_equals_its_output_alone(model_path):
    llm = engine(model_path)
    prompts = make_prompts()
    batched = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    alone = [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert batched == alone


def test_small_pool_forces_preemption_but_changes_nothing(model_path):
    prompts = make_prompts()
    ample = tokens(engine(model_path).generate(prompts, GREEDY, use_tqdm=False))
    # 6 requests x up to 69 tokens need ~30 blocks of 16; give 8 (one long request still fits: 5 blocks)
    small = engine(model_path, num_kv_blocks=8, enable_prefix_caching=False)
    out = tokens(small.generate(prompts, GREEDY, use_tqdm=False))
    assert small.engine.num_preemptions_total > 0, "the pool was meant to be too small to hold every request"
    assert out == ample
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks


def test_chunked_prefill_with_tiny_budget_changes_nothing(model_path):
    prompts = make_prompts()
    ample = tokens(engine(model_path).generate(prompts, GREEDY, use_tqdm=False))
    chunked = engine(model_path, max_num_batched_tokens=7, max_num_seqs=3)
    assert tokens(chunked.generate(prompts, GREEDY, use_tqdm=False)) == ample


def test_prefix_cache_hit_changes_nothing_and_is_counted(model_path):
    llm = engine(model_path)
    base = make_prompts()[5]["prompt_token_ids"]  # 45 tokens: two full blocks to share
    first = tokens(llm.generate([{"prompt_token_ids": base}], GREEDY, use_tqdm=False))
    again = llm.generate([{"prompt_token_ids": base}], GREEDY, use_tqdm=False)
    assert again[0].num_cached_tokens == 32
    assert tokens(again) == first
    assert llm.engine.kv.prefix_hits >= 32


def test_repeated_blocks_at_other_positions_match_the_cache_off_run(model_path):
    """Tokens of a cached block that reappear at another position (after another prefix, or
    repeated in one prompt) are recomputed: outputs equal those without prefix caching."""
    g = torch.Generator().manual_seed(3)
    x, y, tail = (torch.randint(3, 1000, (n,), generator=g).tolist() for n in (16, 16, 5))  # x, y: a block each
    prompts = [x + tail, y + x + tail, x + x + tail, x + x + x + tail, y + x + x + tail]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    cached = engine(model_path)
    # one prompt at a time, so each finds the blocks of the ones before it in the cache
    with_cache = [cached.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]
    assert [o.num_cached_tokens for o in with_cache] == [0, 0, 16, 32, 32]  # only true prefixes hit
    plain = engine(model_path, enable_prefix_caching=False)
    without = plain.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tokens(with_cache) == tokens(without)
    for a, b in zip(with_cache, without):  # the scores too, not just the argmax
        for ea, eb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert ea[tok].logprob == pytest.approx(eb[tok].logprob, abs=1e-4)

def test_no_block_is_left_after_finish_and_abort(model_path):
    llm = engine(model_path)
    eng = llm.engine
    for i, p in enumerate(make_prompts()):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.kv.num_free_blocks < eng.kv.num_blocks
    eng.abort_request(["r0", "r3", "unknown"])
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert not eng.scheduler.requests


def test_abort_of_waiting_request_frees_nothing_twice(model_path):
    llm = engine(model_path, max_num_seqs=1)
    eng = llm.engine
    eng.add_request("a", make_prompts()[4], SamplingParams(max_tokens=5))
    eng.add_request("b", make_prompts()[3], SamplingParams(max_tokens=5))
    eng.step()
    assert eng.scheduler.requests["b"].status == RequestStatus.WAITING
    eng.abort_request("b")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
