"""Sliding-window KV memory (plain Python): blocks before every layer's window are freed during
generation, a request holds a bounded number of blocks, and the prefix cache stays right.

A shadow of the cache records, for every block slot the simulated model writes, the whole
token prefix that produced it (the slot's content, as far as attention is concerned). Every
step then checks that (a) no token is written to or read (inside its window) from a freed
table entry, and (b) every block the prefix cache hands out under a hash holds exactly the
prefix that hash stands for: a freed block reused by another request never stays reachable
under its old hash, in the synchronous loop and in the async one (the next step scheduled
before the last one's tokens are known).
"""

from __future__ import annotations

import pytest

from nanovllm.engine.input_processor import InputProcessor
from nanovllm.engine.kv_cache_manager import KVCacheManager, window_blocks_needed
from nanovllm.engine.request import Request
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig
from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import StepOutput

BS = 4
WINDOW = 8


def make_req(rid, prompt, max_tokens, n=1):
    params = SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True)
    return Request(rid, list(prompt), params, max_tokens, parent_id=rid, pending_fork=n if n > 1 else 0)


class Shadow:
    """Who wrote each block slot (request, position), and the token prefix each hash stands for."""

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.writer: dict[tuple[int, int], tuple[str, int]] = {}  # (block, offset) -> (request id, position)
        self.tokens: dict[str, list[int]] = {}  # request id -> its known tokens

    def step(self, out) -> None:
        """Apply one scheduled step: the forks' block copies, then every new token's K/V write."""
        kv = self.kv
        for src, dst in out.blocks_to_copy:
            for offset in range(BS):
                if (src, offset) in self.writer:
                    self.writer[(dst, offset)] = self.writer[(src, offset)]
        for item in out.scheduled:
            rid = item.request.request_id
            table, dead = kv.blocks_of(rid), kv.num_window_freed.get(rid, 0)
            start, end = item.start_position, item.start_position + item.num_new_tokens
            first_read = max(0, start - WINDOW + 1)  # the oldest key its first new token reads
            assert first_read // BS >= dead, f"{rid}: reads key {first_read} from a freed table entry"
            for p in range(start, end):
                self.writer[(table[p // BS], p % BS)] = (rid, p)

    def check_prefix_cache(self, requests: dict[str, Request]) -> None:
        prefix_of_hash = {}
        for rid, req in requests.items():
            self.tokens[rid] = req.prompt_token_ids + req.output_token_ids
            for i, h in enumerate(req.block_hashes):
                prefix_of_hash[h] = tuple(self.tokens[rid][: (i + 1) * BS])
        for h, block in self.kv.cached.items():
            prefix = prefix_of_hash[h]
            for offset in range(BS):
                assert (block, offset) in self.writer, f"block {block} registered before it was written"
                rid, pos = self.writer[(block, offset)]
                assert pos == len(prefix) - BS + offset, f"block {block} holds position {pos}, its hash another"
                assert tuple(self.tokens[rid][: pos + 1]) == prefix[: pos + 1], f"block {block}: another prefix"


def model(out, step: int) -> StepOutput:
    """Sampled tokens that differ by request and step (so that blocks' contents differ)."""
    return StepOutput({s.request.request_id: 3 + (hash((s.request.request_id, step)) % 5)
                       for s in out.scheduled if s.needs_sample})


def run(sched: Scheduler, asynchronous: bool, max_steps: int = 2000) -> list:
    shadow = Shadow(sched.kv)
    held, previous, step = [], None, 0
    all_requests = dict(sched.requests)
    while sched.has_unfinished() or previous is not None:
        step += 1
        assert step < max_steps, "scheduler did not finish"
        out = sched.schedule()
        all_requests.update(sched.requests)
        shadow.step(out)
        if asynchronous:
            sched.advance(out)
            if previous is not None:
                sched.update(previous, model(previous, step - 1), advanced=True)
            previous = out if out.scheduled else None
        else:
            sched.update(out, model(out, step))
        shadow.check_prefix_cache(all_requests)
        held.append({rid: len(sched.kv.live_blocks_of(rid)) for rid in sched.kv.req_blocks})
    assert sched.kv.num_free_blocks == sched.kv.num_blocks, "leaked blocks"
    return held


def make_sched(num_blocks: int, budget: int = 16, window=WINDOW, prefix=True, max_num_seqs=8) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix, sliding_window=window)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 512, True), kv)


def test_out_of_window_blocks_are_freed_once():
    kv = KVCacheManager(16, BS, sliding_window=WINDOW)
    req = make_req("a", range(1, 21), max_tokens=4)  # 20 tokens: 5 blocks
    assert kv.allocate_slots(req, 20)
    req.num_computed_tokens = 20
    kv.cache_computed_blocks(req)
    assert kv.free_out_of_window(req) == 3  # the next token (position 20) reads keys 13..20: blocks 3, 4 (and 5)
    assert kv.free_out_of_window(req) == 0  # nothing more until it moves on
    assert kv.num_free_blocks == 16 - 2 and kv.live_blocks_of("a") == kv.blocks_of("a")[3:]
    table = kv.blocks_of("a")
    assert len(table) == 5, "freed entries keep their positions"
    freed_hashes = [kv.block_hash[b] for b in table[:3]]
    assert all(h is not None for h in freed_hashes), "freed full blocks stay in the prefix cache"
    kv.free(req)
    assert kv.num_free_blocks == 16  # no double free of the dead entries
    assert all(c >= 0 for c in kv.ref_cnt)


def test_no_window_frees_nothing():
    kv = KVCacheManager(16, BS)
    req = make_req("a", range(1, 21), max_tokens=4)
    assert kv.allocate_slots(req, 20)
    req.num_computed_tokens = 20
    assert kv.free_out_of_window(req) == 0 and kv.num_free_blocks == 11


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_generation_four_windows_long_holds_bounded_blocks(asynchronous):
    sched = make_sched(num_blocks=64, budget=16)
    sched.add_request(make_req("long", range(1, 41), max_tokens=4 * WINDOW))  # 40-token prompt in 16-token chunks
    sched.add_request(make_req("short", range(5, 10), max_tokens=4 * WINDOW))
    held = run(sched, asynchronous)
    prefill_bound = window_blocks_needed(WINDOW, 16, BS)
    decode_bound = window_blocks_needed(WINDOW, 2, BS)  # async: one token in flight, one scheduled
    assert max(h.get("long", 0) for h in held) <= prefill_bound
    assert max(h["short"] for h in held[-WINDOW:] if "short" in h) <= decode_bound
    assert len(held) > 4 * WINDOW
    assert max(max(h.values(), default=0) for h in held[8:]) <= prefill_bound < (40 + 4 * WINDOW) // BS


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_prefix_cache_stays_right_when_freed_blocks_are_reused(asynchronous):
    """A pool so small that freed blocks are handed out again at once, prompts sharing prefixes
    (hits on blocks that were freed out of a window), n = 2 forks, preemption."""
    sched = make_sched(num_blocks=14, budget=12, max_num_seqs=4)
    shared = list(range(1, 19))
    for i in range(6):
        prompt = shared[: 10 + 3 * i] + [20 + i] * (i % 3)
        sched.add_request(make_req(f"r{i}", prompt, max_tokens=10 + 3 * i, n=2 if i % 2 else 1))
    run(sched, asynchronous)


def test_a_window_lets_a_generation_longer_than_the_pool_in():
    processor = InputProcessor(None, 100, max_model_len=512, max_num_seqs=4, num_kv_blocks=8, block_size=BS,
                               max_num_batched_tokens=16, sliding_window=WINDOW)
    processor.check_fits(SamplingParams(max_tokens=300), prompt_len=20, max_tokens=300)  # 80 blocks' worth
    without = InputProcessor(None, 100, max_model_len=512, max_num_seqs=4, num_kv_blocks=8, block_size=BS,
                             max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="KV cache blocks"):
        without.check_fits(SamplingParams(max_tokens=300), prompt_len=20, max_tokens=300)
    sched = make_sched(num_blocks=8, budget=16)
    sched.add_request(make_req("a", range(1, 21), max_tokens=300))
    run(sched, asynchronous=False)
