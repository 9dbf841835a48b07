"""ModelRunner: turns one StepInput (step_io.py) into a forward pass and sampled tokens.

It keeps the worker's state of every live request (request_states.py), updated from each
step's input. Host-side inputs are built with numpy (one pass per request, never per token)
in one pinned buffer and copied to the device in one transfer (staging.py); the forward
pass gets an explicit ForwardContext. On CUDA, decode-only batches replay a captured CUDA
graph (see cuda_graphs.py).

A step is `launch` (enqueue everything on the device, return at once) then `resolve`
(wait for the sampled tokens, build the StepOutput). With async scheduling the
engine launches step N+1 before resolving step N: a decode token that step N sampled is
then not known on the host yet, and step N+1 reads it from step N's sampled-token tensor
on the device (the `pending_dst` / `pending_src` rows of `prepare_inputs`).

Tensor parallelism: every rank runs the same steps on its shard of the model; the logits
are gathered on rank 0, which alone samples (and builds the StepOutput); its sampled tokens
are broadcast to the other ranks on the device, where async scheduling's next step reads
them like rank 0 does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from nanovllm.kernels import decode_plan, kv_quant
from nanovllm.kernels.launch_math import cascade_queries_per_tile
from nanovllm.layers.attention.cascade import CascadeRule, plan_cascade
from nanovllm.layers.forward_context import CascadeInputs, ForwardContext
from nanovllm.layers.tp_group import SINGLE, TPGroup
from nanovllm.outputs import Logprob
from nanovllm.step_io import StepInput, StepOutput
from nanovllm.worker.request_states import RequestState, RequestStates
from nanovllm.worker.sampler import (Sampler, SamplerOutput, SamplingBatch, compute_prompt_logprobs,
                                     to_device_async)
from nanovllm.worker.grammar_mask import grammar_rows_to_device
from nanovllm.worker.staging import StagingBuffer
from nanovllm.worker.timeline import StepTimeline

logger = logging.getLogger(__name__)


# Two sets of pinned staging buffers: a step's host-to-device copies may still be queued
# while the next step fills the other set (async scheduling keeps one step in flight).
NUM_STAGING_SETS = 2


@dataclass(frozen=True)
class RunnerOptions:
    """How the runner builds a step's inputs (from EngineConfig and the worker's kernel choices)."""

    balanced_decode: bool = False  # decode-only batches carry a balanced split-KV plan (kernels/decode_plan.py)
    max_model_len: int = 0  # the block-table width of a persistent batch (0: not known)

    @classmethod
    def of(cls, config, kernel_options, max_model_len: int) -> "RunnerOptions":
        triton_attention = kernel_options.triton and kernel_options.triton_attention
        return cls(balanced_decode=config.decode_split == "balanced" and triton_attention, max_model_len=max_model_len)


@dataclass
class ForwardInputs:
    """One step's inputs on the device (built from the plain-data StepInput by prepare_inputs)."""

    input_ids: torch.Tensor  # [T] int64
    ctx: ForwardContext
    logits_indices: Optional[torch.Tensor]  # [S] rows of the hidden states to sample from; None = all, in order
    sample_requests: list[RequestState]  # the requests that sample this step, in logits_indices order
    num_output_tokens: list[int]  # per sampling request: generated so far, the pending one included
    prompt_logprob_spans: list  # (request state, token_offset, num_tokens, first_position)


@dataclass
class LaunchedStep:
    """A step whose device work is enqueued; `ModelRunner.resolve` turns it into results."""

    sample_requests: list[RequestState]  # in sampled-row order
    sampler_output: Optional[SamplerOutput]  # device tensors (None on tensor-parallel ranks > 0)
    host_tokens: Optional[torch.Tensor]  # [S] int64 CPU copy of the sampled tokens (non-blocking on CUDA)
    done: Optional[torch.cuda.Event]  # recorded after the step's last device work (CUDA only)
    result: StepOutput  # prompt logprobs are filled in at launch
    timeline: Optional[tuple] = None  # (StepRecord, start event) when the runner keeps a timeline


class ModelRunner:
    def __init__(self, model, device: torch.device, kv_cache_dtype: torch.dtype, num_kv_blocks: int,
                 block_size: int, eos_token_ids: list[int], step_timer=None,
                 options: RunnerOptions = RunnerOptions(), tp: TPGroup = SINGLE) -> None:
        self.model = model
        self.tp = tp  # rank 0 samples; the others receive its tokens
        self.device = device
        self.kv_cache_dtype = kv_cache_dtype
        self.options = options
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.eos_token_ids = list(eos_token_ids)
        self.sampler = Sampler()
        self.requests = RequestStates(-(-options.max_model_len // block_size))  # max_model_len 0: grows
        self.kv_caches = self._allocate_kv_cache(num_kv_blocks)
        self.cuda_graphs = None  # a CUDAGraphRunner, set by the worker on CUDA unless enforce_eager
        self._staging_sets = [StagingBuffer(pin=device.type == "cuda") for _ in range(NUM_STAGING_SETS)]
        # Cascade attention (layers/attention/cascade.py): the worker sets the rule; None = never plan.
        self.cascade_rule: Optional[CascadeRule] = None
        layers = model.attention_layers()
        self.cascade_queries_per_tile = cascade_queries_per_tile(max(a.num_heads // a.num_kv_heads for a in layers))
        self._cascade_staging_sets = [StagingBuffer(pin=device.type == "cuda") for _ in range(NUM_STAGING_SETS)]
        self.num_cascade_steps = 0  # steps that had a plan (benchmarks, tests)
        self._num_launched = 0
        # the last step's sampled tokens on the device, and each sampling request's row there
        self._last_sampled: Optional[torch.Tensor] = None
        self._last_sampled_rows: dict[str, int] = {}
        # (row settings, SamplingBatch) of the last step when that batch can serve the next one
        self._reused_batch: Optional[tuple[list, SamplingBatch]] = None
        self.step_timer = step_timer  # the engine's StepTimer (step_timing=True): `mark(phase)` after prepare
        layers = model.attention_layers()
        self.num_kv_heads = layers[0].num_kv_heads if layers else 1
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                        else decode_plan.DEFAULT_NUM_SMS)
        self.timeline: Optional[StepTimeline] = None  # set by the worker (step_timeline=True)

    # ------------------------------------------------------------------ KV cache
    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        caches = []
        for attn in self.model.attention_layers():
            shape = (num_blocks, attn.num_kv_heads, self.block_size, attn.cache_head_dim)
            k = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            attn.k_cache, attn.v_cache = k, v
            caches.append((k, v))
        return caches

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = to_device_async(torch.tensor([p[0] for p in pairs]), self.device)
        dst = to_device_async(torch.tensor([p[1] for p in pairs]), self.device)
        for k, v in self.kv_caches:
            if k.dtype == kv_quant.FP8_DTYPE:  # copied as bytes: indexing kernels need not know fp8
                k, v = k.view(torch.uint8), v.view(torch.uint8)
            k[dst] = k[src]
            v[dst] = v[src]

    # ------------------------------------------------------------------ inputs
    def _staging(self) -> StagingBuffer:
        """This step's host buffer, alternating between sets.

        Reuse is safe: set i is refilled two launches later, and by then the engine has
        resolved the step that last used it, which waits for all of its device work.
        """
        return self._staging_sets[self._num_launched % NUM_STAGING_SETS]

    def prepare_inputs(self, step: StepInput) -> ForwardInputs:
        """The step's input arrays, filled in the staging buffer and copied to the device once.

        Everything that is arithmetic over the batch (query starts, sequence lengths, block
        tables, positions, slots, sampled rows) is a handful of numpy operations over the whole
        step; only what each request holds in Python lists (its next token ids, a pending token's
        row in the previous step's samples) is gathered in one pass over the requests.
        """
        bs = self.block_size
        states = self.requests
        reqs = [states[rid] for rid in step.req_ids]  # [num_seqs] this step's requests, in batch order
        num_new_list, starts_list, samples = step.num_new_tokens, step.start_positions, step.needs_sample
        num_seqs = len(reqs)
        num_tokens = step.num_batched_tokens or sum(num_new_list)
        num_new = np.array(num_new_list, dtype=np.int64)  # [num_seqs]
        starts = np.array(starts_list, dtype=np.int64)  # [num_seqs]
        max_blocks = max([len(r.block_ids) for r in reqs])
        tokens, seqs = (num_tokens,), (num_seqs,)
        plan_seqs = plan_rows = 0
        if self.options.balanced_decode and num_tokens == num_seqs:  # decode-only: a balanced split plan
            plan_seqs = self.cuda_graphs.batch_size_for(num_seqs) if self.cuda_graphs is not None else num_seqs
            plan_rows = decode_plan.plan_items(plan_seqs, self.num_kv_heads, self.num_sms)
        staging = self._staging()
        host = staging.layout({
            "input_ids": (tokens, torch.int64),
            "positions": (tokens, torch.int64),
            "slot_mapping": (tokens, torch.int64),
            "query_start_loc": ((num_seqs + 1,), torch.int32),
            "seq_lens": (seqs, torch.int32),
            "block_tables": ((num_seqs, max_blocks), torch.int32),
            "logits_indices": (seqs, torch.int64),  # first num_sample entries used
            "pending_dst": (seqs, torch.int64),  # async: token rows to fill from the last step's samples
            "pending_src": (seqs, torch.int64),
            **({"decode_plan": ((plan_rows, decode_plan.PLAN_COLUMNS), torch.int32)} if plan_rows else {}),
        })
        input_ids, positions, slot_mapping = host["input_ids"], host["positions"], host["slot_mapping"]
        query_start_loc, seq_lens, block_tables = host["query_start_loc"], host["seq_lens"], host["block_tables"]

        # ---- what each request holds: token ids, pending rows, sampling and prompt-logprob rows
        token_ids: list[int] = []  # [num_tokens] in batch order (0 where a pending token goes)
        sample_requests, num_outputs, prompt_spans = [], [], []
        pending_dst, pending_src = [], []
        last_rows = self._last_sampled_rows
        t = 0
        for i, req in enumerate(reqs):
            n, start = num_new_list[i], starts_list[i]
            known = len(req.prompt_token_ids) + len(req.output_token_ids)
            pending = 0
            if n == 1:  # decode
                if start < known:
                    token_ids.append(req.token_id_at(start))
                else:  # sampled by the step still in flight
                    token_ids.append(0)
                    pending = 1
                    pending_dst.append(t)
                    row = last_rows.get(req.req_id)
                    if row is None:  # internal invariant (engine/scheduler bookkeeping), never user input
                        raise RuntimeError(f"request {req.req_id} has a pending token but the last step did not "
                                           "sample it")
                    pending_src.append(row)
            else:
                if start + n > known:  # scheduler invariant: pending tokens are decoded alone
                    raise RuntimeError(f"request {req.req_id}: a {n}-token chunk covers a pending token")
                token_ids += req.token_ids_slice(start, start + n)
            if req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens:
                prompt_spans.append((req, t, min(start + n, req.num_prompt_tokens) - start, start))
            if samples[i]:
                sample_requests.append(req)
                num_outputs.append(len(req.output_token_ids) + pending)
            t += n
        input_ids[:] = token_ids

        # ---- batch arithmetic, whole arrays at once
        query_start_loc[0] = 0
        query_start_loc[1:] = np.cumsum(num_new)  # [num_seqs]
        seq_lens[:] = starts + num_new
        # the block tables, each row zero-padded (rows of the persistent tables: one gather)
        states.tables.gather(np.array([r.row for r in reqs], dtype=np.int64), max_blocks, block_tables)
        if num_tokens == num_seqs:  # decode only: one token per request
            seq_of_token = np.arange(num_seqs)  # [T]
            positions[:] = starts
        else:
            seq_of_token = np.repeat(np.arange(num_seqs), num_new)  # [T]
            # token t of request s sits at starts[s] + (t - query_start_loc[s])
            positions[:] = np.arange(num_tokens) + np.repeat(starts - query_start_loc[:-1], num_new)
        slot_mapping[:] = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        num_sample, num_pending = len(sample_requests), len(pending_dst)
        if num_sample:  # each sampling request's last token row
            host["logits_indices"][:num_sample] = query_start_loc[1:][np.array(samples, dtype=bool)] - 1
        host["pending_dst"][:num_pending] = pending_dst
        host["pending_src"][:num_pending] = pending_src
        max_query_len = int(num_new.max())
        if plan_rows:  # CUDA-graph padding rows (length 1, see cuda_graphs.py) get their item too
            lens = seq_lens if plan_seqs == num_seqs else np.concatenate(
                [seq_lens, np.ones(plan_seqs - num_seqs, dtype=np.int32)])
            decode_plan.build_plan(lens, plan_rows, decode_plan.KEY_TILE, out=host["decode_plan"])
        dev = staging.to_device(self.device)  # the step's one host-to-device copy
        cascade = None
        if self.cascade_rule is not None:
            cascade = self._cascade_inputs(block_tables, seq_lens, query_start_loc, num_tokens, max_query_len)
        ctx = ForwardContext(
            positions=dev["positions"],
            slot_mapping=dev["slot_mapping"],
            query_start_loc=dev["query_start_loc"],
            seq_lens=dev["seq_lens"],
            block_tables=dev["block_tables"],
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            num_seqs=num_seqs,
            decode_plan=dev["decode_plan"] if plan_rows else None,
            query_start_loc_cpu=query_start_loc.tolist() if self.device.type == "cpu" else None,
            seq_lens_cpu=seq_lens.tolist() if self.device.type == "cpu" else None,
            cascade=cascade,
        )
        input_ids_dev = dev["input_ids"]
        if num_pending:
            # input_ids[dst] = last step's sampled tokens[src], on the device (no host sync)
            src = self._last_sampled.index_select(0, dev["pending_src"][:num_pending])
            input_ids_dev.index_copy_(0, dev["pending_dst"][:num_pending], src)
        return ForwardInputs(
            input_ids=input_ids_dev,
            ctx=ctx,
            # increasing row indices: as many as rows means every row (a decode step), no gather
            logits_indices=None if num_sample == num_tokens else dev["logits_indices"][:num_sample],
            sample_requests=sample_requests,
            num_output_tokens=num_outputs,
            prompt_logprob_spans=prompt_spans,
        )

    def _cascade_inputs(self, block_tables: np.ndarray, seq_lens: np.ndarray, query_start_loc: np.ndarray,
                        num_tokens: int, max_query_len: int) -> Optional[CascadeInputs]:
        """The step's shared prefixes (or None), planned on the host arrays and copied to the
        device in one more transfer (only on steps that have a plan)."""
        capacity = None  # an eager step takes any number of tiles; a graph replay its capacity
        if self.cuda_graphs is not None:
            capacity = self.cuda_graphs.plan_capacity(len(seq_lens), num_tokens, max_query_len)
            if capacity == 0:
                return None
        plan = plan_cascade(block_tables, seq_lens, query_start_loc, self.block_size, self.cascade_queries_per_tile,
                            self.cascade_rule, max_tiles=capacity, pad_tiles=capacity is not None)
        if plan is None:
            return None
        self.num_cascade_steps += 1
        arrays = {"suffix_block_tables": plan.suffix_block_tables, "suffix_seq_lens": plan.suffix_seq_lens,
                  "tiles": plan.tiles, "query_rows": plan.query_rows}
        if self.device.type == "cpu":  # the planner's arrays are new each step: no staging needed
            dev = {name: torch.from_numpy(a) for name, a in arrays.items()}
        else:
            staging = self._cascade_staging_sets[self._num_launched % NUM_STAGING_SETS]
            host = staging.layout({name: (a.shape, torch.int32) for name, a in arrays.items()})
            for name, a in arrays.items():
                host[name][...] = a
            dev = staging.to_device(self.device)
        cpu = self.device.type == "cpu"
        return CascadeInputs(
            suffix_block_tables=dev["suffix_block_tables"], suffix_seq_lens=dev["suffix_seq_lens"],
            tiles=dev["tiles"], query_rows=dev["query_rows"], queries_per_tile=plan.queries_per_tile,
            max_suffix_len=plan.max_suffix_len, max_shared_len=plan.max_shared_len,
            prefixes=plan.prefixes if cpu else None,
            suffix_seq_lens_cpu=plan.suffix_seq_lens.tolist() if cpu else None,
        )

    # ------------------------------------------------------------------ execute
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step and wait for its results (the synchronous engine loop)."""
        return self.resolve(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepInput) -> LaunchedStep:
        """Update the request states, then enqueue the step's device work: block copies,
        forward, logits, sampling.

        Returns without waiting for the device, except for prompt logprobs (rare; they are
        read from hidden states that a CUDA graph's next replay would overwrite).
        """
        self.requests.apply(step)
        self.copy_blocks(step.blocks_to_copy)
        if not step.req_ids:
            return LaunchedStep([], None, None, None, StepOutput(sampled_token_ids={}))
        marks = self.timeline.begin(step, self.requests) if self.timeline is not None else None
        inputs = self.prepare_inputs(step)
        self._num_launched += 1
        if self.step_timer:
            self.step_timer.mark("prepare_inputs")
        hidden = self._forward(inputs)  # [T, hidden]
        if self.step_timer:
            self.step_timer.mark("forward")
        result = StepOutput(sampled_token_ids={})
        if inputs.prompt_logprob_spans:
            self._prompt_logprobs(hidden, inputs, result)
        reqs = inputs.sample_requests
        out = host_tokens = None
        if reqs:
            # [S, V], sampler upcasts; None on tensor-parallel ranks > 0 (gathered to rank 0)
            logits = self.model.compute_logits(hidden, inputs.logits_indices)
            if logits is not None:
                out = self._sample(logits, reqs, inputs, step)
                del logits  # freed here, not at return: on a CPU the step timer counts it as the sampler's
                if self.step_timer:
                    self.step_timer.mark("sample")
                sampled = out.sampled_token_ids  # [S]
                host_tokens = sampled.to("cpu", non_blocking=True)  # the step's one device->host copy
            else:
                sampled = torch.empty(len(reqs), dtype=torch.int64, device=self.device)
            if self.tp.world_size > 1:
                self.tp.broadcast_from_first(sampled)  # every rank feeds them to the next step
            self._last_sampled = sampled  # [S]: the next step's pending tokens
            self._last_sampled_rows = {r.req_id: i for i, r in enumerate(reqs)}
        done = None
        if marks is not None:
            done = self.timeline.end_event()  # timing-enabled; None on CPU
        elif self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return LaunchedStep(reqs, out, host_tokens, done, result, marks)

    def _sample(self, logits: torch.Tensor, reqs: list[RequestState], inputs: ForwardInputs,
                step: StepInput) -> SamplerOutput:
        if self.step_timer:
            self.step_timer.mark("forward")  # the logits (and prompt logprobs) are device work too
        params = [r.sampling_params for r in reqs]
        vocab_size = logits.shape[-1]
        reused = self._reused_batch
        if reused is not None and reused[1].vocab_size == vocab_size and reused[0] == params:
            # the same settings row by row as the step before, and a batch that depends on nothing
            # else (SamplingBatch.params_only): its tensors serve again, no host work, no copies
            batch = reused[1]
        else:
            prompts = [()] * len(reqs)  # penalties read the prompts (as arrays: a memcpy each step)
            if any(p.uses_penalties for p in params):
                prompts = [r.prompt_array if p.uses_penalties else () for r, p in zip(reqs, params)]
            batch = SamplingBatch.build(
                params=params,
                prompt_token_ids=prompts,
                output_token_ids=[r.output_token_ids for r in reqs],
                eos_token_ids=self.eos_token_ids,
                vocab_size=vocab_size,
                device=logits.device,
                num_output_tokens=inputs.num_output_tokens,
            )
            self._reused_batch = (params, batch) if batch.params_only else None
        if step.grammar_bitmask is not None:  # structured outputs: the engine's per-row token masks
            batch.grammar_bitmask, batch.grammar_rows = grammar_rows_to_device(
                step.grammar_bitmask, step.grammar_rows, logits.device)
        if self.step_timer:
            self.step_timer.mark("sampling_prep")
        return self.sampler(logits, batch)

    def resolve(self, step: LaunchedStep) -> StepOutput:
        """Wait for a launched step and turn its sampled tokens (and logprobs) into host values
        (an empty output on tensor-parallel ranks > 0)."""
        if step.done is not None:
            step.done.synchronize()
        if step.timeline is not None:  # the step's events are complete: reading them adds no sync
            self.timeline.finish(*step.timeline, step.done)
        result = step.result
        if not step.sample_requests or step.sampler_output is None:
            return result
        reqs, out = step.sample_requests, step.sampler_output
        tokens = step.host_tokens.tolist()
        result.sampled_token_ids = {r.req_id: tok for r, tok in zip(reqs, tokens)}
        if out.sampled_logprobs is not None:
            self._collect_logprobs(reqs, tokens, out, result)
        return result

    def _forward(self, inputs: ForwardInputs) -> torch.Tensor:
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(inputs):
            return self.cuda_graphs.run(inputs)
        return self.model(inputs.input_ids, inputs.ctx.positions, inputs.ctx)

    # ------------------------------------------------------------------ logprobs
    def _collect_logprobs(self, reqs, tokens, out, result: StepOutput) -> None:
        lp = out.sampled_logprobs.tolist()
        ranks = out.sampled_ranks.tolist()
        top_ids = out.topk_token_ids.tolist() if out.topk_token_ids is not None else None
        top_lps = out.topk_logprobs.tolist() if out.topk_logprobs is not None else None
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            k = req.sampling_params.logprobs
            if k is None:
                continue
            entry = {tok: Logprob(lp[i], ranks[i])}
            if top_ids is not None:
                for rank, (tid, tlp) in enumerate(zip(top_ids[i][:k], top_lps[i][:k]), start=1):
                    entry.setdefault(tid, Logprob(tlp, rank))
            result.logprobs[req.req_id] = entry

    def _prompt_logprobs(self, hidden, inputs: ForwardInputs, result: StepOutput) -> None:
        """Logprob of each prompt token given the ones before it (first token: None)."""
        for req, offset, count, first_pos in inputs.prompt_logprob_spans:
            # rows predicting prompt positions first_pos+1 .. first_pos+count (within the prompt)
            positions = [p for p in range(first_pos, first_pos + count) if p + 1 < req.num_prompt_tokens]
            entries = [None] if first_pos == 0 else []
            result.prompt_logprobs[req.req_id] = (first_pos, entries)
            if not positions:
                continue
            rows = torch.arange(offset, offset + len(positions), device=hidden.device)
            logits = self.model.compute_logits(hidden, rows)  # [P, V]; None on tensor-parallel ranks > 0
            if logits is None:
                continue
            logits = logits.float()
            targets = torch.tensor([req.prompt_token_ids[p + 1] for p in positions], device=hidden.device)
            k = req.sampling_params.prompt_logprobs
            tok_lp, ranks, top_ids, top_lps = compute_prompt_logprobs(logits, targets, k)
            tok_lp, ranks = tok_lp.tolist(), ranks.tolist()
            top_ids = top_ids.tolist() if top_ids is not None else [[]] * len(positions)
            top_lps = top_lps.tolist() if top_lps is not None else [[]] * len(positions)
            for j, p in enumerate(positions):
                tgt = req.prompt_token_ids[p + 1]
                entry = {tgt: Logprob(tok_lp[j], ranks[j])}
                for rank, (tid, tlp) in enumerate(zip(top_ids[j][:k], top_lps[j][:k]), start=1):
                    entry.setdefault(tid, Logprob(tlp, rank))
                entries.append(entry)
