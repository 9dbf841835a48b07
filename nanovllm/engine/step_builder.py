"""StepBuilder: the scheduler's decision for one step -> the worker's plain-data StepInput.

The worker keeps its own copy of every live request (worker/request_states.py), so a step
carries only what changed (step_io.py): a request the worker does not hold comes whole
(prompt, sampling settings, block table, tokens generated so far); a held one brings the
blocks appended and the tokens generated since it was last sent. Each Request records what
was sent (`num_outputs_sent`, -1 = the worker does not hold it; `num_blocks_sent`).
Tokens of a launched step that have not reached the host yet (async scheduling) are not
sent: the worker reads them from that step's sampled tensor on the device.

Host work is O(scheduled requests): one pass, list slices of the new items only. Requests
with a grammar also get their next token's bitmask row, filled by the engine's matchers
(engine/structured_output.py); the worker only applies it.
"""

from __future__ import annotations

from typing import Optional

from nanovllm.engine.scheduler import Scheduler, SchedulerOutput
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.step_io import NewRequest, StepInput


class StepBuilder:
    def __init__(self, scheduler: Scheduler, structured: Optional[StructuredOutputManager] = None) -> None:
        self.scheduler = scheduler
        self.structured = structured  # the engine's grammar matchers (None without a tokenizer)

    def build(self, sched: SchedulerOutput) -> StepInput:
        preempted = []
        for req in sched.preempted:
            if req.num_outputs_sent >= 0:
                preempted.append(req.request_id)
            req.num_outputs_sent = -1  # its blocks are gone: it comes back whole
        items = sched.scheduled
        new_requests, new_tokens, new_blocks = [], {}, {}
        for item in items:
            req = item.request
            outputs = req.output_token_ids
            sent = req.num_outputs_sent
            if sent < 0:
                blocks = item.block_ids
                new_requests.append(NewRequest(req.request_id, req.prompt_token_ids, req.sampling_params,
                                               list(blocks), list(outputs)))
                req.num_outputs_sent, req.num_blocks_sent = len(outputs), len(blocks)
                continue
            if len(outputs) > sent:
                new_tokens[req.request_id] = outputs[sent:]
                req.num_outputs_sent = len(outputs)
            blocks = item.block_ids
            if len(blocks) > req.num_blocks_sent:
                new_blocks[req.request_id] = blocks[req.num_blocks_sent :]
                req.num_blocks_sent = len(blocks)
        finished, self.scheduler.finished_req_ids = self.scheduler.finished_req_ids, []
        bitmask, grammar_rows = self._grammar_bitmask(items)
        return StepInput(
            req_ids=[item.request.request_id for item in items],
            num_new_tokens=[item.num_new_tokens for item in items],
            start_positions=[item.start_position for item in items],
            needs_sample=[item.needs_sample for item in items],
            finished_req_ids=finished,
            preempted_req_ids=preempted,
            new_requests=new_requests,
            new_token_ids=new_tokens,
            new_block_ids=new_blocks,
            blocks_to_copy=list(sched.blocks_to_copy),
            num_batched_tokens=sched.num_batched_tokens,
            grammar_bitmask=bitmask,
            grammar_rows=grammar_rows,
        )

    def _grammar_bitmask(self, items) -> tuple:
        """(int32 [R, W] token bitmask, each row's index among the sampled rows), or (None, []).

        Each constrained request's matcher first accepts its tokens generated so far: the
        engine resolved every step that sampled them (`_needs_token_values`), so they are all
        known on the host here.
        """
        if self.structured is None:
            return None, []
        sampled = [item.request for item in items if item.needs_sample]
        specs = [req.sampling_params.structured_outputs for req in sampled]
        if all(spec is None for spec in specs):
            return None, []
        for req, spec in zip(sampled, specs):
            if spec is not None and req.num_pending_tokens:  # engine invariant, never user input
                raise RuntimeError(f"request {req.request_id} samples under a grammar with a token in flight")
        filled = self.structured.fill_bitmask([req.request_id for req in sampled], specs,
                                              [req.output_token_ids for req in sampled])
        return filled if filled is not None else (None, [])
