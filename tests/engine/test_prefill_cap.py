"""The prefill cap under continuous arrivals (scheduling policy `max_prefill_tokens_while_decoding`), and the
step accounting the request timeline logs (SchedulerOutput.num_prefill_tokens, .admitted); torch-free."""

from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_scheduler import fake_run, make_req

BS = 4


def make_sched(budget, cap, num_blocks=512, max_num_seqs=16):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 1024, True, cap), kv)


def run_with_arrivals(sched, arrivals, max_steps=5000):
    """arrivals: {step index: [requests]}; per step (schedule output, ids ready to decode before it,
    ids of running requests with one token left: decodes, and prompts' last tokens, which the cap leaves alone)."""
    steps = []
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.add_request(req)
        if not sched.has_unfinished() and step > max(arrivals, default=0):
            return steps
        one_left = {r.request_id for r in sched.running if r.num_tokens - r.num_computed_tokens == 1}
        decodes = {rid for rid in one_left if sched.requests[rid].num_output_tokens > 0}
        out = sched.schedule()
        steps.append((out, decodes, one_left))
        sched.update(out, fake_run(out))
    raise AssertionError("scheduler did not finish")


def prefill_tokens(out, excluded) -> int:
    """Tokens of the step's chunks but those of the `excluded` requests."""
    return sum(s.num_new_tokens for s in out.scheduled if s.request.request_id not in excluded)


def test_arrivals_while_others_decode_are_capped_and_decodes_keep_their_pace():
    sched = make_sched(budget=256, cap=24)
    reqs = [make_req(f"r{i}", 40 + 7 * i, max_tokens=6, start=100 * i + 1) for i in range(6)]
    steps = run_with_arrivals(sched, {0: reqs[:2], 3: reqs[2:4], 5: reqs[4:]})
    assert any(prefill_tokens(out, one) == 24 for out, d, one in steps if d)  # reached, not just respected
    for out, decodes, one_left in steps:
        assert prefill_tokens(out, decodes) == out.num_prefill_tokens
        if decodes:
            assert prefill_tokens(out, one_left) <= 24
        assert decodes <= {s.request.request_id for s in out.scheduled}  # every ready request decodes
    assert all(len(r.output_token_ids) == 6 for r in reqs)
    assert sched.kv.num_free_blocks == 512  # nothing leaked


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
    admitted = []
    for out, decodes, one_left in run_with_arrivals(sched, arrivals):
        assert prefill_tokens(out, decodes) == out.num_prefill_tokens
        if decodes:
            assert prefill_tokens(out, one_left) <= cap
        assert out.num_batched_tokens <= budget
        assert decodes <= {s.request.request_id for s in out.scheduled}
        admitted += [r.request_id for r in out.admitted]
    assert sorted(admitted) == sorted(r.request_id for r in reqs)  # each admitted once (no preemption here)
    assert all(len(r.output_token_ids) == 3 for r in reqs)
    assert sched.kv.num_free_blocks == 1024


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(1, 90), min_size=1, max_size=8), budget=st.integers(16, 128),
       gaps=st.lists(st.integers(0, 3), min_size=8, max_size=8))
def test_a_cap_equal_to_the_budget_changes_nothing(lens, budget, gaps):
    def trace(cap):
        sched = make_sched(budget=budget, cap=cap, num_blocks=1024)
        arrivals, step = {}, 0
        for i, (n, gap) in enumerate(zip(lens, gaps)):
            step += gap
            arrivals.setdefault(step, []).append(make_req(f"r{i}", n, max_tokens=3, start=97 * i + 1))
        return [[(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
                for out, _, _ in run_with_arrivals(sched, arrivals)]

    assert trace(None) == trace(budget)
