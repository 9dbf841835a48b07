"""The chunked-prefill cap: while requests decode, a step computes at most N prompt tokens."""

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.request import Request
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig
from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import StepOutput

BS = 4


def make_sched(cap, budget=64):
    kv = KVCacheManager(128, BS)
    return Scheduler(SchedulerConfig(8, budget, 512, True, cap), kv)


def make_req(rid, prompt_len, max_tokens=50, start=1):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(start, start + prompt_len)), params, max_tokens, eos_token_ids=(0,))


def step(sched):
    out = sched.schedule()
    sched.update(out, StepOutput({s.request.request_id: 7 for s in out.scheduled if s.needs_sample}))
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


def test_a_long_prompt_is_spread_over_steps_while_others_decode():
    sched = make_sched(cap=8)
    sched.add_request(make_req("a", 5))
    sched.add_request(make_req("b", 6, start=100))
    assert step(sched) == {"a": 5, "b": 6}  # nobody decodes yet: no cap
    sched.add_request(make_req("long", 30, start=200))
    chunks = []
    while True:
        share = step(sched)
        assert share["a"] == 1 and share["b"] == 1  # the decodes run every step
        chunks.append(share.get("long", 0))
        if sum(chunks) == 30:
            break
    assert chunks == [8, 8, 8, 6]
    assert step(sched) == {"a": 1, "b": 1, "long": 1}


def test_the_cap_covers_all_prompt_tokens_of_a_step():
    sched = make_sched(cap=10)
    sched.add_request(make_req("a", 3))
    step(sched)
    for i, n in enumerate((7, 7, 7)):
        sched.add_request(make_req(f"p{i}", n, start=50 * (i + 1)))
    share = step(sched)
    assert share == {"a": 1, "p0": 7, "p1": 3}  # 10 prompt tokens: p1 is chunked, p2 waits
    share = step(sched)
    assert share == {"a": 1, "p0": 1, "p1": 4, "p2": 6}  # p0 decodes now


def test_without_a_cap_or_without_decodes_the_budget_rules():
    sched = make_sched(cap=None)
    sched.add_request(make_req("a", 3))
    step(sched)
    sched.add_request(make_req("long", 40, start=100))
    assert step(sched) == {"a": 1, "long": 40}
    capped = make_sched(cap=8)
    capped.add_request(make_req("long", 40))
    assert step(capped) == {"long": 40}


def test_the_cap_is_validated():
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        EngineConfig(max_prefill_tokens_while_decoding=64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding"):
        EngineConfig(max_prefill_tokens_while_decoding=0)
    with pytest.raises(ValueError, match="cascade_attention"):
        EngineConfig(cascade_attention="yes")
    assert EngineConfig(max_prefill_tokens_while_decoding=256).max_prefill_tokens_while_decoding == 256
