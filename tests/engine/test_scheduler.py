"""Scheduler: token budget, FIFO admission, preemption order, n>1 fork, no leaks (plain Python)."""

import random

from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig
from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import StepOutput

BS = 4
EOS = 0


def make_sched(num_blocks=64, max_num_seqs=8, budget=32, max_model_len=256, chunked=True, prefix=True):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len, chunked), kv)


def make_req(rid, prompt_len, max_tokens=4, n=1, start=1):
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True)
    return Request(rid, list(range(start, start + prompt_len)), params, max_tokens, eos_token_ids=(EOS,),
                   parent_id=rid, pending_fork=n if n > 1 else 0)


def fake_run(out, token=7):
    """A model that samples `token` for every request that samples."""
    return StepOutput({s.request.request_id: token for s in out.scheduled if s.needs_sample})


def run_to_end(sched, max_steps=1000):
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        out = sched.schedule()
        steps.append(out)
        sched.update(out, fake_run(out))
    raise AssertionError("scheduler did not finish: deadlock or livelock")


def test_budget_is_respected_and_prefill_is_chunked():
    sched = make_sched(budget=16)
    sched.add_request(make_req("a", 40))
    out = sched.schedule()
    assert out.num_batched_tokens == 16
    assert [s.num_new_tokens for s in out.scheduled] == [16]
    assert not out.scheduled[0].needs_sample
    for out in run_to_end(sched):
        assert out.num_batched_tokens <= 16
        assert sum(s.num_new_tokens for s in out.scheduled) == out.num_batched_tokens


def test_without_chunked_prefill_a_long_prompt_waits_for_a_full_budget():
    sched = make_sched(budget=16, chunked=False)
    sched.add_request(make_req("a", 8))
    sched.add_request(make_req("b", 12))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a"]  # b (12) > remaining 8


def test_decode_requests_are_scheduled_before_new_prefills():
    sched = make_sched(budget=10)
    sched.add_request(make_req("a", 6, max_tokens=10))
    out = sched.schedule()
    sched.update(out, fake_run(out))
    sched.add_request(make_req("b", 20))
    out = sched.schedule()
    ids = [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]
    assert ids == [("a", 1), ("b", 9)]


def test_fifo_admission_and_max_num_seqs():
    sched = make_sched(max_num_seqs=2, budget=100)
    for rid in "abc":
        sched.add_request(make_req(rid, 4, start=ord(rid)))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_preemption_takes_newest_and_everything_finishes():
    # 6 blocks of 4 tokens; three requests of 8 prompt + 8 new tokens need 4 blocks each at the end
    sched = make_sched(num_blocks=6, budget=64)
    reqs = [make_req(rid, 8, max_tokens=8, start=10 * i + 1) for i, rid in enumerate("abc")]
    for r in reqs:
        sched.add_request(r)
    preempted = []
    steps = run_to_end(sched)
    for out in steps:
        preempted += [r.request_id for r in out.preempted]
    assert preempted, "the pool is small enough that preemption must happen"
    assert "a" not in preempted  # the oldest request is never the victim while others run
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert all(r.num_output_tokens == 8 for r in reqs)
    assert sched.kv.num_free_blocks == 6


def test_preempted_request_is_recomputed_with_its_outputs():
    sched = make_sched(num_blocks=6, budget=64)
    reqs = [make_req(rid, 8, max_tokens=8, start=10 * i + 1) for i, rid in enumerate("abc")]
    for r in reqs:
        sched.add_request(r)
    seen_recompute = False
    while sched.has_unfinished():
        out = sched.schedule()
        for s in out.scheduled:
            r = s.request
            # never compute beyond the known tokens, and always inside allocated blocks
            assert r.num_computed_tokens + s.num_new_tokens <= r.num_tokens
            assert len(s.block_ids) * BS >= r.num_computed_tokens + s.num_new_tokens
            if r.num_preemptions and r.num_computed_tokens == 0:
                seen_recompute = True
                assert r.num_output_tokens > 0  # recompute covers prompt and generated tokens
        sched.update(out, fake_run(out))
    assert seen_recompute


def test_finish_on_eos_and_stop_token_and_min_tokens():
    sched = make_sched()
    params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[5])
    r = Request("a", [1, 2, 3], params, 10, eos_token_ids=(EOS,), parent_id="a")
    sched.add_request(r)
    tokens = iter([EOS, 9, EOS])  # EOS ignored before min_tokens
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, StepOutput({"a": next(tokens)} if out.scheduled[0].needs_sample else {}))
    assert r.output_token_ids == [EOS, 9, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED
    r2 = Request("b", [1, 2, 3], params, 10, eos_token_ids=(EOS,), parent_id="b")
    sched.add_request(r2)
    tokens = iter([3, 5])
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, StepOutput({"b": next(tokens)}))
    assert r2.stop_reason == 5 and r2.status == RequestStatus.FINISHED_STOPPED


def test_max_model_len_stops_generation():
    sched = make_sched(max_model_len=10)
    r = make_req("a", 8, max_tokens=100)
    sched.add_request(r)
    run_to_end(sched)
    assert r.num_tokens == 10 and r.status == RequestStatus.FINISHED_LENGTH


def test_abort_frees_blocks_wherever_the_request_is():
    sched = make_sched(max_num_seqs=1)
    sched.add_request(make_req("a", 8))
    sched.add_request(make_req("b", 8, start=50))
    out = sched.schedule()
    sched.update(out, fake_run(out))
    sched.finish_requests(["a", "b", "missing"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_fork_for_n_shares_prompt_blocks():
    sched = make_sched(num_blocks=64, budget=64)
    r = make_req("a", 10, max_tokens=4, n=3)
    sched.add_request(r)
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 9  # all but the last prompt token
    sched.update(out, fake_run(out))
    out = sched.schedule()
    assert [c.request_id for c in out.forked] == ["a#1", "a#2"]
    assert len(out.blocks_to_copy) == 2  # the partially filled block, once per child
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1, 1]
    blocks = [s.block_ids for s in out.scheduled]
    assert blocks[0][:2] == blocks[1][:2] == blocks[2][:2]  # full blocks shared
    assert len({b[2] for b in blocks}) == 3  # partial block private
    sched.update(out, fake_run(out))
    run_to_end(sched)
    assert sched.kv.num_free_blocks == 64


def test_random_workload_never_leaks_or_deadlocks():
    rng = random.Random(0)
    for trial in range(20):
        sched = make_sched(num_blocks=rng.randint(12, 40), max_num_seqs=rng.randint(1, 6),
                           budget=rng.randint(4, 40), chunked=rng.random() < 0.8)
        reqs = []
        for i in range(rng.randint(1, 12)):
            plen, mt = rng.randint(1, 20), rng.randint(1, 12)
            n = rng.choice([1, 1, 2, 3])
            need = -(-(plen + mt) // BS) + (n - 1) * (-(-mt // BS) + 1)
            if need > sched.kv.num_blocks or n > sched.config.max_num_seqs:
                continue  # the engine refuses these at add_request
            if not sched.config.enable_chunked_prefill and plen + mt > sched.config.max_num_batched_tokens:
                continue
            r = make_req(f"r{i}", plen, max_tokens=mt, n=n, start=rng.randint(1, 3))
            reqs.append(r)
            sched.add_request(r)
        run_to_end(sched, max_steps=5000)
        assert sched.kv.num_free_blocks == sched.kv.num_blocks, f"trial {trial} leaked blocks"


# ----------------------------------------------------------------------------- async scheduling: pending tokens


def test_scheduler_plans_the_pending_token_and_stops_at_max_tokens():
    sched = make_sched(num_blocks=16, max_num_seqs=4, budget=64, max_model_len=64)
    req = make_req("a", 5, max_tokens=3)
    sched.add_request(req)
    first = sched.schedule()
    sched.advance(first)
    assert req.num_pending_tokens == 1 and req.num_computed_tokens == 5
    second = sched.schedule()  # planned before the first token is known
    item = second.scheduled[0]
    assert (item.start_position, item.num_new_tokens, item.needs_sample) == (5, 1, True)
    sched.advance(second)
    assert req.num_pending_tokens == 2
    sched.update(first, StepOutput({"a": 11}), advanced=True)
    assert req.output_token_ids == [11] and req.num_pending_tokens == 1
    third = sched.schedule()  # token 3 of 3 is pending after this: nothing left to plan
    sched.advance(third)
    sched.update(second, StepOutput({"a": 12}), advanced=True)
    assert req.num_pending_tokens == 1
    fourth = sched.schedule()
    assert fourth.is_empty, "a request whose last token is in flight must not be scheduled again"
    sched.update(third, StepOutput({"a": 13}), advanced=True)
    assert req.output_token_ids == [11, 12, 13] and req.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_scheduler_finished_request_ignores_its_in_flight_token():
    sched = make_sched(num_blocks=16, max_num_seqs=4, budget=64, max_model_len=64)
    req = make_req("a", 3, max_tokens=10)
    sched.add_request(req)
    first = sched.schedule()
    sched.advance(first)
    second = sched.schedule()
    sched.advance(second)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update(first, StepOutput({"a": 4}), advanced=True) == []
    assert sched.update(second, StepOutput({"a": 5}), advanced=True) == []
    assert req.output_token_ids == [] and sched.kv.num_free_blocks == sched.kv.num_blocks


def test_scheduler_preempted_request_waits_for_its_pending_token():
    # 24 slots: each request fits alone (15 tokens), not both
    sched = make_sched(num_blocks=6, max_num_seqs=4, budget=64, max_model_len=64)
    a, b = make_req("a", 5, max_tokens=10), make_req("b", 5, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    prev = None
    preempted_pending = False
    for _ in range(100):
        out = sched.schedule()
        for s in out.scheduled:  # a pending token is only ever planned as a lone decode
            assert s.request.num_pending_tokens == 0 or s.num_new_tokens == 1
        preempted_pending |= any(r.num_pending_tokens for r in out.preempted)
        sched.advance(out)
        if prev is not None:
            sched.update(prev, StepOutput({s.request.request_id: 7 for s in prev.scheduled
                                                  if s.needs_sample}), advanced=True)
        prev = out
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert preempted_pending, "the pool was meant to force preemption of a request with a token in flight"
    assert a.output_token_ids == [7] * 10 and b.output_token_ids == [7] * 10
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_preempted_request_goes_back_to_the_front_of_the_queue():
    """A preempted request keeps its place: it is readmitted before requests that arrived after it."""
    # 5 blocks of 4: a and b (8-token prompts) take 2 blocks each; when both need a third,
    # only one is free, so b (the newest running) is preempted while c waits for a seat
    sched = make_sched(num_blocks=5, max_num_seqs=2, budget=64)
    a, b, c = (make_req(rid, 8, max_tokens=4, start=10 * i + 1) for i, rid in enumerate("abc"))
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    sched.update(out, fake_run(out))
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    sched.update(out, fake_run(out))
    admitted = []  # order in which b and c leave the queue
    while sched.has_unfinished():
        waiting_before = [r.request_id for r in sched.waiting]
        out = sched.schedule()
        still = {r.request_id for r in sched.waiting}
        admitted += [rid for rid in waiting_before if rid not in still and rid not in admitted]
        sched.update(out, fake_run(out))
    assert admitted == ["b", "c"]
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
