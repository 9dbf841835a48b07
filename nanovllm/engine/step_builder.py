"""StepBuilder: the scheduler's decision for one step -> the worker's plain-data StepInput.

The worker keeps its own copy of every live request (worker/request_states.py), so a step
carries only what changed (step_io.py): a request the worker does not hold comes whole
(prompt, sampling settings, block table, tokens generated so far); a held one brings the
blocks appended and the tokens generated since it was last sent. Each Request records what
was sent (`num_outputs_sent`, -1 = the worker does not hold it; `num_blocks_sent`).
Tokens of a launched step that have not reached the host yet (async scheduling) are not
sent: the worker reads them from that step's sampled tensor on the device.

Host work is O(scheduled requests): one pass, list slices of the new items only.
"""

from __future__ import annotations

from nanovllm.engine.scheduler import Scheduler, SchedulerOutput
from nanovllm.step_io import NewRequest, StepInput


class StepBuilder:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

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
        )
