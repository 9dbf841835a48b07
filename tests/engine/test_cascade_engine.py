"""Cascade attention changes no token: greedy fp32 CPU outputs with it forced on and off.

Prefix-cache hits and n > 1 forks make requests share physical KV blocks; with
`cascade_attention="force"` every decode step whose batch shares whole blocks runs the
shared-prefix path (`torch_backend.cascade_decode`), with "off" never.
"""

import pytest
import torch

from nanovllm import LLM, SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    kw = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=256)
    return {mode: LLM(path, cascade_attention=mode, **kw) for mode in ("force", "off")}


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def run(llm, prefixes, tails, n=1):
    """Cache each prefix with one request first (so the batch shares its blocks), then run the batch."""
    runner = llm.engine.executor.worker.runner
    for p in prefixes:
        llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    before = runner.num_cascade_steps
    prompts = [{"prompt_token_ids": prefixes[i % len(prefixes)] + t if prefixes else t} for i, t in enumerate(tails)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, n=n)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs], runner.num_cascade_steps - before


@pytest.mark.parametrize("case", ["none", "one", "two", "mid-block"])
def test_cascade_on_and_off_give_the_same_tokens(engines, case):
    seed = {"none": 1, "one": 2, "two": 3, "mid-block": 4}[case]
    prefixes = {"none": [], "one": [ids(48, seed)], "two": [ids(48, seed), ids(64, seed + 10)],
                "mid-block": [ids(40, seed)]}[case]  # 40 tokens: 2 whole blocks shared, 8 tokens each its own
    tails = [ids(n, seed + 20 + n) for n in (3, 9, 17, 5, 12)]
    on, steps_on = run(engines["force"], prefixes, tails)
    off, steps_off = run(engines["off"], prefixes, tails)
    assert on == off
    assert steps_off == 0
    assert (steps_on > 0) == bool(prefixes), f"cascade ran on {steps_on} steps"


def test_n_completions_share_their_prompt_blocks(engines):
    """n > 1 forks share the prompt's whole blocks: seeded sampling, same tokens either way."""
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
    prompt = {"prompt_token_ids": ids(70, 9)}
    outs = {}
    for mode, llm in engines.items():
        before = llm.engine.executor.worker.runner.num_cascade_steps
        outs[mode] = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
        if mode == "force":
            assert llm.engine.executor.worker.runner.num_cascade_steps > before
    assert outs["force"] == outs["off"]
    assert len({tuple(t) for t in outs["force"]}) > 1  # the completions really differ


def test_no_block_is_leaked(engines):
    for llm in engines.values():
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_prefix_cache_hit_rate_in_stats(engines):
    stats = engines["force"].engine.stats()
    kv = engines["force"].engine.kv
    assert stats["prefix_cache_hits"] > 0
    assert stats["prefix_cache_hit_rate"] == kv.prefix_hits / kv.prefix_queries
