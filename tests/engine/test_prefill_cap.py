"""The per-step prefill token cap (scheduling policy `max_prefill_tokens_per_step`), on the torch-free scheduler."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.config import EngineConfig
from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_scheduler import fake_run, make_req

BS = 4


def make_sched(budget, cap, num_blocks=512, max_num_seqs=16):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 1024, True, cap), kv)


def run_with_arrivals(sched, arrivals, max_steps=5000):
    """arrivals: {step index: [requests]}; returns per step (schedule output, ids that were waiting before it)."""
    steps = []
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.add_request(req)
        if not sched.has_unfinished() and step > max(arrivals, default=0):
            return steps
        waiting = {r.request_id for r in sched.waiting}
        running_decodes = {r.request_id for r in sched.running if r.num_tokens - r.num_computed_tokens == 1}
        out = sched.schedule()
        steps.append((out, waiting, running_decodes))
        sched.update(out, fake_run(out))
    raise AssertionError("scheduler did not finish")


def prefill_tokens(out, decodes) -> int:
    """Tokens of the step's chunks that are not one-token decodes of requests that were ready to decode."""
    return sum(s.num_new_tokens for s in out.scheduled if s.request.request_id not in decodes)


def test_cap_bounds_prefill_and_never_delays_decodes():
    sched = make_sched(budget=256, cap=24)
    reqs = [make_req(f"r{i}", 40 + 7 * i, max_tokens=6, start=100 * i + 1) for i in range(6)]
    arrivals = {0: reqs[:2], 3: reqs[2:4], 5: reqs[4:]}  # new prompts keep arriving while others decode
    steps = run_with_arrivals(sched, arrivals)
    assert any(prefill_tokens(out, d) == 24 for out, _, d in steps)  # the cap is reached, not just respected
    for out, waiting, decodes in steps:
        assert prefill_tokens(out, decodes) == out.num_prefill_tokens <= 24
        scheduled = {s.request.request_id for s in out.scheduled}
        assert decodes <= scheduled  # every request ready to decode gets its token this step
    assert all(len(r.output_token_ids) == 6 for r in reqs)
    assert sched.kv.num_free_blocks == 512  # nothing leaked


def test_without_cap_the_burst_fills_the_budget():
    """The failure mode the cap exists for: without it one step computes every new prompt at once."""
    reqs = [make_req(f"r{i}", 60, max_tokens=2, start=100 * i + 1) for i in range(4)]
    out = make_sched(budget=256, cap=None)
    for r in reqs:
        out.add_request(r)
    assert out.schedule().num_batched_tokens == 240
    capped = make_sched(budget=256, cap=64)
    for r in [make_req(f"r{i}", 60, max_tokens=2, start=100 * i + 1) for i in range(4)]:
        capped.add_request(r)
    first = capped.schedule()
    assert first.num_batched_tokens == 64
    assert [s.num_new_tokens for s in first.scheduled] == [60, 4]  # FIFO: the second prompt gets the rest


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 90), min_size=1, max_size=10), cap=st.integers(1, 64),
       budget=st.integers(64, 200), gaps=st.lists(st.integers(0, 4), min_size=10, max_size=10))
def test_cap_invariants_hold_for_any_arrivals(lens, cap, budget, gaps):
    sched = make_sched(budget=budget, cap=cap, num_blocks=1024)
    reqs = [make_req(f"r{i}", n, max_tokens=3, start=97 * i + 1) for i, n in enumerate(lens)]
    arrivals, step = {}, 0
    for r, gap in zip(reqs, gaps):
        step += gap
        arrivals.setdefault(step, []).append(r)
    for out, waiting, decodes in run_with_arrivals(sched, arrivals):
        assert prefill_tokens(out, decodes) == out.num_prefill_tokens <= cap
        assert out.num_batched_tokens <= budget
        assert decodes <= {s.request.request_id for s in out.scheduled}
    assert all(len(r.output_token_ids) == 3 for r in reqs)
    assert sched.kv.num_free_blocks == 1024


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(1, 90), min_size=1, max_size=8), budget=st.integers(16, 128))
def test_a_cap_equal_to_the_budget_changes_nothing(lens, budget):
    def trace(cap):
        sched = make_sched(budget=budget, cap=cap, num_blocks=1024)
        for i, n in enumerate(lens):
            sched.add_request(make_req(f"r{i}", n, max_tokens=3, start=97 * i + 1))
        return [[(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
                for out, _, _ in run_with_arrivals(sched, {})]

    assert trace(None) == trace(budget)


@pytest.mark.parametrize("kwargs, error", [
    ({"max_prefill_tokens_per_step": 0}, ValueError),
    ({"max_prefill_tokens_per_step": -5}, ValueError),
    ({"max_prefill_tokens_per_step": True}, TypeError),
    ({"max_prefill_tokens_per_step": 512.0}, TypeError),
    ({"max_prefill_tokens_per_step": 9000, "max_num_batched_tokens": 8192}, ValueError),
    ({"max_prefill_tokens_per_step": 512, "enable_chunked_prefill": False}, ValueError),
])
def test_engine_config_validates_the_cap(kwargs, error):
    with pytest.raises(error, match="max_prefill_tokens_per_step"):
        EngineConfig(**kwargs)


def test_engine_config_accepts_a_valid_cap():
    assert EngineConfig(max_prefill_tokens_per_step=2048).max_prefill_tokens_per_step == 2048
