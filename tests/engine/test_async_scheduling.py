"""Async scheduling: launching step N+1 before step N's tokens reach the host changes no output.

(The scheduler's own bookkeeping for it, `advance` / pending tokens, is tested in plain
Python in test_scheduler.py.)

On CPU every device op runs synchronously, so these tests check the bookkeeping (pending
tokens gathered from the last step's samples, late stops, preemption and aborts while a
step is in flight), not the overlap itself; the GPU benchmarks measure that.
"""

import pytest
import torch

from nanovllm import LLM, SamplingParams

MAX_TOKENS = 20


@pytest.fixture(scope="module")
def model_path(tiny_model_factory):
    return tiny_model_factory("qwen3")


def make_prompts(lens=(1, 3, 16, 17, 31, 45), seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, 1000, (k,), generator=g).tolist()} for k in lens]


def engine(path, async_scheduling, **kw):
    kw.setdefault("max_model_len", 128)
    return LLM(path, skip_tokenizer_init=True, device="cpu", dtype="float32",
               async_scheduling=async_scheduling, **kw)


def summary(outs):
    """Everything a request's output says, per completion."""
    rows = []
    for o in outs:
        for c in o.outputs:
            lps = None if c.logprobs is None else [sorted((t, round(lp.logprob, 4)) for t, lp in e.items())
                                                   for e in c.logprobs]
            rows.append((o.request_id, c.index, c.token_ids, c.finish_reason, c.stop_reason, lps))
    return rows


def both(path, prompts, params, **kw):
    sync = engine(path, False, **kw)
    asyn = engine(path, True, **kw)
    assert asyn.engine.async_scheduling and not sync.engine.async_scheduling
    a = summary(asyn.generate(prompts, params, use_tqdm=False))
    s = summary(sync.generate(prompts, params, use_tqdm=False))
    assert asyn.engine.kv.num_free_blocks == asyn.engine.kv.num_blocks, "async run leaked KV blocks"
    return a, s


PARAM_SETS = {
    "greedy": SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    "seeded_top_k_top_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=3, max_tokens=MAX_TOKENS,
                                         ignore_eos=True),
    "seeded_min_tokens": SamplingParams(temperature=1.0, seed=9, min_tokens=6, max_tokens=MAX_TOKENS),
    "penalties": SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.3, frequency_penalty=0.5,
                                presence_penalty=0.4, max_tokens=MAX_TOKENS, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, logprobs=3, prompt_logprobs=2, max_tokens=8, ignore_eos=True),
    "n2_seeded": SamplingParams(n=2, temperature=0.9, seed=4, max_tokens=MAX_TOKENS, ignore_eos=True),
}


@pytest.mark.parametrize("name", sorted(PARAM_SETS))
def test_async_equals_sync(model_path, name):
    a, s = both(model_path, make_prompts(), PARAM_SETS[name])
    assert a == s


def test_mixed_lengths_and_parameters_in_one_batch(model_path):
    prompts = make_prompts()
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (1, 2, 3, 7, 19, 30)]
    params[1] = SamplingParams(temperature=0.5, seed=2, max_tokens=2, repetition_penalty=1.2, ignore_eos=True)
    a, s = both(model_path, prompts, params)
    assert a == s
    assert [len(r[2]) for r in a] == [1, 2, 3, 7, 19, 30]


def test_stop_token_found_late_is_honoured(model_path):
    """The step after a stop token is already launched when the stop is seen: its token is dropped."""
    prompts = make_prompts()
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    free = engine(model_path, False).generate(prompts, greedy, use_tqdm=False)
    stop_id = free[4].outputs[0].token_ids[5]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id], ignore_eos=True)
    a, s = both(model_path, prompts, params)
    assert a == s
    assert a[4][2][-1] == stop_id and len(a[4][2]) <= 6 and a[4][3] == "stop"


def test_preemption_and_chunked_prefill(model_path):
    prompts = make_prompts()
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ample = summary(engine(model_path, False).generate(prompts, greedy, use_tqdm=False))
    small = engine(model_path, True, num_kv_blocks=8, enable_prefix_caching=False, max_num_batched_tokens=13)
    out = summary(small.generate(prompts, greedy, use_tqdm=False))
    assert small.engine.num_preemptions_total > 0, "the pool was meant to be too small to hold every request"
    assert out == ample
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks


def test_abort_while_a_step_is_in_flight(model_path):
    prompts = make_prompts()[:3]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = summary(engine(model_path, False).generate(prompts, greedy, use_tqdm=False))
    llm = engine(model_path, True)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, greedy)
    finished = {}
    for _ in range(4):
        for out in eng.step():
            assert out.request_id != "1" or not out.finished
    assert eng._in_flight is not None, "async scheduling should keep a step in flight"
    eng.abort_request("1")
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id != "1", "an aborted request must not produce output"
            if out.finished:
                finished[out.request_id] = out
    got = summary([finished["0"], finished["2"]])
    assert [r[1:] for r in got] == [expected[0][1:], expected[2][1:]]
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_prefix_cache_hits_with_async(model_path):
    prompt = make_prompts(lens=(40,))[0]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = engine(model_path, True)
    first = summary(llm.generate([prompt], greedy, use_tqdm=False))
    again = llm.generate([prompt], greedy, use_tqdm=False)
    assert again[0].num_cached_tokens == 32
    assert summary(again)[0][1:] == first[0][1:]


def test_stop_string_with_a_tokenizer():
    """Stop strings are found by the detokenizer, a step late under async scheduling."""
    params = SamplingParams(temperature=0, max_tokens=24, stop=[" the"])
    prompts = ["Write one sentence about the sea", "List three colours"]
    runs = {}
    for flag in (False, True):
        llm = LLM(device="cpu", async_scheduling=flag, max_model_len=256)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[flag] = [(o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs]
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    assert runs[True] == runs[False]
