"""Token-budget scheduler (torch-free).

Each step spends one budget of `max_num_batched_tokens` over requests: running ones first
(oldest first: decode tokens and unfinished prefill chunks), then waiting ones in FIFO
order while seats (`max_num_seqs`) and KV blocks last. When a running request cannot get
a block, the newest running request is preempted (its blocks freed, its tokens recomputed
later), so the oldest always make progress and nothing deadlocks: the engine refuses, at
`add_request`, any request that could not fit in the whole pool by itself.

With `max_prefill_tokens_while_decoding` set, a step in which some request is decoding
computes at most that many prompt tokens (prefill chunks, recomputation): a long prompt is
spread over several short steps instead of stalling every decode for one long step
(docs/memory.md, "Chunked prefill").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.step_io import StepOutput

SEED_MIX = 0x5851F42D4C957F2D  # odd 64-bit constant to derive children's seeds
SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    max_prefill_tokens_while_decoding: Optional[int] = None  # None: no cap beyond the budget


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    `start_position` and `needs_sample` are fixed when the step is scheduled: with async
    scheduling the request's counters move on before the step's results come back.
    """

    request: Request
    num_new_tokens: int  # tokens computed this step, starting at start_position
    block_ids: list[int]  # the request's whole block table (a live reference, do not mutate)
    start_position: int = field(init=False)
    needs_sample: bool = field(init=False)  # this chunk reaches the last token: the next one is sampled

    def __post_init__(self) -> None:
        r = self.request
        self.start_position = r.num_computed_tokens
        self.needs_sample = r.num_computed_tokens + self.num_new_tokens == r.num_tokens and not r.pending_fork


@dataclass
class SchedulerOutput:
    """The scheduler's decision for one step, with live Requests (engine-internal; the worker
    gets it as plain data through `step_builder.StepBuilder`)."""

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    num_prefill_tokens: int = 0  # of num_batched_tokens: all but the one-token decodes (prompt chunks, recomputation)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before forward
    preempted: list[Request] = field(default_factory=list)
    forked: list[Request] = field(default_factory=list)  # new n>1 children created this step
    admitted: list[Request] = field(default_factory=list)  # scheduled for the first time (not after preemption)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # ids finished (or aborted) since the last step was handed to the worker, which drops them
        self.finished_req_ids: list[str] = []

    # ------------------------------------------------------------------ bookkeeping
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _seats_used(self) -> int:
        """Running requests, counting an unforked n>1 request as its n completions."""
        return sum(max(1, r.pending_fork) for r in self.running)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (e.g. abort or stop-string) requests wherever they are; frees their blocks."""
        finished = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self.kv.free(req)
            self.finished_req_ids.append(rid)
            finished.append(req)
        return finished

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[], num_batched_tokens=0)
        self._fork_ready(out)

        prefill_left = self._prefill_allowance()  # None = only the budget limits prompt tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            to_compute = self._tokens_to_compute(req)
            num_new = min(to_compute, budget)
            is_decode = to_compute == 1 and req.num_output_tokens + req.num_pending_tokens > 0
            if num_new > 1 and prefill_left is not None:  # a prefill chunk or a recomputation
                num_new = min(num_new, prefill_left)
                prefill_left -= num_new
            if num_new <= 0:
                i += 1
                continue
            self.kv.free_out_of_window(req)  # sliding-window models: blocks no token will read again
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req itself was preempted: nothing younger is left to run
            out.scheduled.append(ScheduledRequest(req, num_new, self.kv.blocks_of(req.request_id)))
            budget -= num_new
            if not is_decode:
                out.num_prefill_tokens += num_new
            i += 1

        if not out.preempted:
            budget = self._admit_waiting(budget, out, prefill_left)
        out.num_batched_tokens = cfg.max_num_batched_tokens - budget
        return out

    def _prefill_allowance(self) -> Optional[int]:
        """Prompt tokens this step may compute: the cap while some request is decoding, else None."""
        cap = self.config.max_prefill_tokens_while_decoding
        if cap is None:
            return None
        for req in self.running:
            if req.num_output_tokens + req.num_pending_tokens > 0 and self._tokens_to_compute(req) <= 1:
                return cap
        return None

    def _tokens_to_compute(self, req: Request) -> int:
        # runs for every running request on every step: the counts are read once, not through properties
        num_outputs = len(req.output_token_ids) + req.num_pending_tokens
        num_tokens = len(req.prompt_token_ids) + num_outputs  # req.num_tokens
        if req.num_pending_tokens and (num_outputs >= req.max_tokens or num_tokens >= self.config.max_model_len):
            return 0  # its last token is on the way (_surely_finished): computing past it would be thrown away
        if req.pending_fork:
            return req.num_prompt_tokens - 1 - req.num_computed_tokens  # children compute the last prompt token
        return num_tokens - req.num_computed_tokens

    def _surely_finished(self, req: Request) -> bool:
        """Whether the length limits end req once its pending tokens arrive."""
        return (req.num_output_tokens + req.num_pending_tokens >= req.max_tokens
                or req.num_tokens >= self.config.max_model_len)

    def _admit_waiting(self, budget: int, out: SchedulerOutput, prefill_left: Optional[int] = None) -> int:
        cfg = self.config
        while self.waiting and budget > 0 and (prefill_left is None or prefill_left > 0):
            req = self.waiting[0]
            if req.num_pending_tokens:
                break  # preempted with a token in flight: readmit once its value is known
            if self._seats_used() + max(1, req.pending_fork) > cfg.max_num_seqs:
                break
            cached_blocks, num_cached = self.kv.find_cached_prefix(req)
            if req.sampling_params.prompt_logprobs is not None:
                cached_blocks, num_cached = [], 0  # every prompt position must be computed
            if req.pending_fork:
                num_cached = min(num_cached, req.num_prompt_tokens - 1)
                cached_blocks = cached_blocks[: num_cached // self.kv.block_size]
            num_new = req.num_tokens - num_cached
            if req.pending_fork:
                num_new = req.num_prompt_tokens - 1 - num_cached
            # Without chunked prefill a prompt waits for a budget that holds it whole (add_request
            # refuses prompts above max_num_batched_tokens); a recompute after preemption that
            # can never fit whole is chunked rather than left waiting forever.
            if not cfg.enable_chunked_prefill and budget < num_new <= cfg.max_num_batched_tokens:
                break
            num_new = min(num_new, budget if prefill_left is None else min(budget, prefill_left))
            req.num_computed_tokens = num_cached
            if not self.kv.allocate_slots(req, num_new, cached_blocks):
                req.num_computed_tokens = 0
                break
            self.kv.free_out_of_window(req)  # cached prefix blocks before the window of its first new token
            self.waiting.popleft()
            if req.num_preemptions == 0:
                self.kv.record_prefix_lookup(req.num_tokens, num_cached)
                req.num_cached_prompt_tokens = num_cached
                out.admitted.append(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if num_new > 0:
                out.scheduled.append(ScheduledRequest(req, num_new, self.kv.blocks_of(req.request_id)))
                budget -= num_new
                out.num_prefill_tokens += num_new
                if prefill_left is not None:
                    prefill_left -= num_new
        return budget

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    # ------------------------------------------------------------------ n > 1
    def _fork_ready(self, out: SchedulerOutput) -> None:
        """Fork n>1 requests whose prompt (but its last token) is cached into n completions."""
        for req in list(self.running):
            if not req.pending_fork or req.num_computed_tokens < req.num_prompt_tokens - 1:
                continue
            n = req.pending_fork
            if self.kv.num_free_blocks < n - 1:
                continue  # try again next step; running requests will free blocks
            req.pending_fork = 0
            pos = self.running.index(req) + 1
            for idx in range(1, n):
                params = req.sampling_params
                if params.seed is not None:  # each completion its own reproducible stream
                    params = params.replace(seed=(params.seed * SEED_MIX + idx) & SEED_MASK)
                child = Request(
                    request_id=f"{req.request_id}#{idx}",
                    prompt_token_ids=req.prompt_token_ids,
                    sampling_params=params,
                    max_tokens=req.max_tokens,
                    eos_token_ids=req.eos_token_ids,
                    arrival_time=req.arrival_time,
                    parent_id=req.parent_id,
                    index=idx,
                    status=RequestStatus.RUNNING,
                    num_computed_tokens=req.num_computed_tokens,
                    num_cached_prompt_tokens=req.num_cached_prompt_tokens,
                )
                copy = self.kv.fork(req, child)
                if copy is not None:
                    out.blocks_to_copy.append(copy)
                self.requests[child.request_id] = child
                self.running.insert(pos, child)
                pos += 1
                out.forked.append(child)

    # ------------------------------------------------------------------ update
    def advance(self, sched: SchedulerOutput) -> None:
        """Async scheduling: count a launched step's tokens as computed before its results arrive.

        The next schedule() then plans each sampling request's next token (a pending one,
        whose value the model runner takes from the GPU); `update(..., advanced=True)`
        later fills in the values.
        """
        for item in sched.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            if item.needs_sample:
                req.num_pending_tokens += 1

    def update(self, sched: SchedulerOutput, result: StepOutput, advanced: bool = False) -> list[Request]:
        """Advance computed counts (unless `advance` did), append sampled tokens, apply token/length stops.

        Returns the requests that got a new token this step (finished or not).
        """
        updated = []
        for item in sched.scheduled:
            req = item.request
            if req.status.is_finished:
                continue  # aborted or stopped meanwhile
            sample = item.needs_sample
            if advanced:
                if sample:
                    req.num_pending_tokens -= 1
            else:
                req.num_computed_tokens += item.num_new_tokens
            if req.status == RequestStatus.RUNNING:  # (async: a preempted request has no blocks)
                self.kv.cache_computed_blocks(req)
            if not sample:
                continue
            token = result.sampled_token_ids.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            updated.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_requests([req.request_id], status)
        return updated

    def _check_stop(self, req: Request, token: int) -> Optional[RequestStatus]:
        params = req.sampling_params
        num_outputs = len(req.output_token_ids)
        if num_outputs >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_outputs >= req.max_tokens or len(req.prompt_token_ids) + num_outputs >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
