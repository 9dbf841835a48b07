"""Property test of the block pool and prefix cache under a seeded random walk (plain Python).

Thousands of random actions on a Scheduler + KVCacheManager: add requests built from a few
shared prefixes (n > 1 forks, prompt-logprob requests that must not hit the cache), run
steps (synchronous, or async with a step in flight as the engine does), abort requests
wherever they are, with pools small enough that preemption is frequent. After every action:

- each block's refcount equals the number of live requests holding it, and a block is in the
  free queue exactly when that number is 0 (no leak, nothing freed twice, no block both
  free and used);
- the prefix-cache index and the blocks' hashes agree both ways, and every hashed block a
  request holds sits at the position whose chain hash it carries (the right tokens);
- only running requests hold blocks, enough for the tokens they have computed.

At the end everything is aborted or finished and the whole pool is free again.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nanovllm.engine.kv_cache_manager import ROOT_BLOCK_HASH, hash_block
from nanovllm.engine.kv_cache_manager import KVCacheManager, blocks_needed
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig
from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import StepOutput

BS = 4
EOS = 0
MAX_MODEL_LEN = 64
ACTIONS_PER_WALK = 700


def chain_hashes(tokens: list[int], num_blocks: int) -> list[int]:
    out, parent = [], ROOT_BLOCK_HASH
    for i in range(num_blocks):
        parent = hash_block(parent, tuple(tokens[i * BS : (i + 1) * BS]))
        out.append(parent)
    return out


def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv
    held = Counter()
    for rid, blocks in kv.req_blocks.items():
        req = sched.requests.get(rid)
        assert req is not None and req.status == RequestStatus.RUNNING, f"{rid} holds blocks but is not running"
        assert len(set(blocks)) == len(blocks), f"{rid} holds a block twice"
        held.update(blocks)
        assert len(blocks) >= blocks_needed(req.num_computed_tokens, BS)
        known = req.all_token_ids
        expected = chain_hashes(known, min(len(blocks), len(known) // BS))
        for i, b in enumerate(blocks[: len(expected)]):
            if kv.block_hash[b] is not None:
                assert kv.block_hash[b] == expected[i], f"{rid}: block {b} at position {i} holds other tokens"
    for b in range(kv.num_blocks):
        assert kv.ref_cnt[b] == held[b], f"block {b}: refcount {kv.ref_cnt[b]}, held by {held[b]}"
        assert (b in kv.free_queue) == (held[b] == 0), f"block {b}: free queue disagrees with its holders"
    assert len(kv.free_queue) + len(held) == kv.num_blocks
    for h, b in kv.cached.items():
        assert kv.block_hash[b] == h
    for b, h in enumerate(kv.block_hash):
        assert h is None or kv.cached.get(h) == b
    for req in sched.waiting:
        assert req.request_id not in kv.req_blocks


class Walk:
    """One random walk: a scheduler, an async in-flight step or none, and the live request ids."""

    def __init__(self, rng: random.Random, async_steps: bool) -> None:
        self.rng = rng
        self.async_steps = async_steps
        chunked = rng.random() < 0.8
        budget = rng.randint(6, 40)
        kv = KVCacheManager(rng.randint(12, 24), BS, enable_prefix_caching=True)
        self.sched = Scheduler(SchedulerConfig(rng.randint(3, 10), budget, MAX_MODEL_LEN, chunked,
                                               rng.choice([None, None, 4])), kv)
        self.prefixes = [[rng.randint(3, 40) for _ in range(rng.randint(2, 14))] for _ in range(3)]
        self.in_flight = None
        self.count = 0
        self.preemptions = 0
        self.hits = 0

    def add(self) -> None:
        rng, cfg, kv = self.rng, self.sched.config, self.sched.kv
        prompt = list(rng.choice(self.prefixes)) + [rng.randint(3, 40) for _ in range(rng.randint(0, 9))]
        max_tokens, n = rng.randint(1, 10), rng.choice([1, 1, 1, 2, 3])
        # what the engine refuses at add_request: never fits the pool, a seat or (unchunked) the budget
        need = blocks_needed(len(prompt) + max_tokens, BS) + (n - 1) * (blocks_needed(max_tokens, BS) + 1)
        if (need > kv.num_blocks or n > cfg.max_num_seqs or len(prompt) + max_tokens > MAX_MODEL_LEN
                or (not cfg.enable_chunked_prefill and len(prompt) + max_tokens > cfg.max_num_batched_tokens)):
            return
        logprobs = 1 if rng.random() < 0.1 else None
        params = SamplingParams(max_tokens=max_tokens, n=n, prompt_logprobs=logprobs)
        rid = f"r{self.count}"
        self.count += 1
        self.sched.add_request(Request(rid, prompt, params, max_tokens, eos_token_ids=(EOS,), parent_id=rid,
                                       pending_fork=n if n > 1 else 0))

    def _tokens(self, out) -> StepOutput:
        """A deterministic 'model': the same tokens so far give the same next token (so generated
        blocks are shared too), with an occasional EOS."""
        sampled = {}
        for s in out.scheduled:
            if s.needs_sample:
                r = s.request
                eos = self.rng.random() < 0.05
                sampled[r.request_id] = EOS if eos else (r.prompt_token_ids[0] * 7 + r.num_tokens) % 37 + 3
        return StepOutput(sampled)

    def step(self) -> None:
        sched = self.sched
        out = sched.schedule()
        self.preemptions += len(out.preempted)
        if not self.async_steps:
            sched.update(out, self._tokens(out))
            return
        sched.advance(out)  # launched: counted as computed before its tokens are known
        if self.in_flight is not None:
            prev = self.in_flight
            sched.update(prev, self._tokens(prev), advanced=True)
        self.in_flight = out

    def abort(self) -> None:
        if self.sched.requests:
            rid = self.rng.choice(sorted(self.sched.requests))
            self.sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)

    def drain(self) -> None:
        for _ in range(2000):
            if not self.sched.has_unfinished() and self.in_flight is None:
                return
            if not self.sched.has_unfinished():
                self.sched.update(self.in_flight, self._tokens(self.in_flight), advanced=True)
                self.in_flight = None
                continue
            self.step()
        raise AssertionError("requests did not finish: deadlock or livelock")


@pytest.mark.parametrize("async_steps", [False, True], ids=["sync", "async"])
def test_random_walk_keeps_the_pool_consistent(async_steps):
    rng = random.Random(1234 + async_steps)
    total_actions, preemptions, hits = 0, 0, 0
    for walk_index in range(4):
        walk = Walk(rng, async_steps)
        for _ in range(ACTIONS_PER_WALK):
            action = rng.choices(("add", "step", "abort"), weights=(3, 6, 1))[0]
            getattr(walk, action)()
            check_invariants(walk.sched)
            total_actions += 1
        walk.drain()
        check_invariants(walk.sched)
        kv = walk.sched.kv
        assert kv.num_free_blocks == kv.num_blocks, f"walk {walk_index} leaked blocks"
        assert all(c == 0 for c in kv.ref_cnt)
        preemptions += walk.preemptions
        hits += kv.prefix_hits
    assert total_actions >= 2800
    print(f"{total_actions} actions, {preemptions} preemptions, {hits} prefix-hit tokens")
    assert preemptions > 0, "the pools were meant to be small enough to preempt"
    assert hits > 0, "the shared prefixes were meant to hit the cache"


def test_a_block_is_hashed_only_once_its_tokens_are_known():
    """Async scheduling: the step in flight counts a pending token as computed. The block that
    token completes must not enter the prefix cache before the token's value is known (it was
    once hashed over the 3 known tokens, a hash no later lookup could match)."""
    kv = KVCacheManager(16, BS)
    sched = Scheduler(SchedulerConfig(4, 32, MAX_MODEL_LEN, True), kv)
    req = Request("a", [5, 6, 7], SamplingParams(max_tokens=8), 8, eos_token_ids=(EOS,))
    sched.add_request(req)
    first = sched.schedule()  # the prompt; samples position 3
    sched.advance(first)
    second = sched.schedule()  # position 3: its token is still on the way
    sched.advance(second)
    assert req.num_computed_tokens == 4 and req.num_known_tokens == 3
    sched.update(first, StepOutput({"a": 9}), advanced=True)
    block = kv.blocks_of("a")[0]
    assert kv.block_hash[block] is None  # position 3 is not known yet
    sched.update(second, StepOutput({"a": 11}), advanced=True)
    assert kv.block_hash[block] == chain_hashes([5, 6, 7, 9], 1)[0]
    check_invariants(sched)
