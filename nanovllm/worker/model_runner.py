"""ModelRunner: turns a SchedulerOutput into one forward pass and sampled tokens.

Host-side inputs are built with numpy (one pass per request, never per token) in one
pinned buffer and copied to the device in one transfer (staging.py); the forward pass gets
an explicit ForwardContext. On CUDA, decode-only batches replay a captured CUDA graph (see
cuda_graphs.py).

A step is `launch` (enqueue everything on the device, return at once) then `resolve`
(wait for the sampled tokens, build the ModelRunnerOutput). With async scheduling the
engine launches step N+1 before resolving step N: a decode token that step N sampled is
then not known on the host yet, and step N+1 reads it from step N's sampled-token tensor
on the device (the `pending_dst` / `pending_src` rows of `prepare_inputs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from nanovllm.engine.scheduler import ModelRunnerOutput, SchedulerOutput
from nanovllm.outputs import Logprob
from nanovllm.worker.forward_context import ForwardContext
from nanovllm.worker.staging import StagingBuffer
from nanovllm.worker.sampler import (Sampler, SamplerOutput, SamplingBatch, compute_prompt_logprobs,
                                     to_device_async)
from nanovllm.worker.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


# Two sets of pinned staging buffers: a step's host-to-device copies may still be queued
# while the next step fills the other set (async scheduling keeps one step in flight).
NUM_STAGING_SETS = 2


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    ctx: ForwardContext
    logits_indices: Optional[torch.Tensor]  # [S] rows of the hidden states to sample from; None = all, in order
    sample_requests: list  # the Request objects that sample this step, in logits_indices order
    prompt_logprob_spans: list  # (request, token_offset, num_tokens, first_position)


@dataclass
class LaunchedStep:
    """A step whose device work is enqueued; `ModelRunner.resolve` turns it into results."""

    sample_requests: list  # Request objects, in sampled-row order
    sampler_output: Optional[SamplerOutput]  # device tensors
    host_tokens: Optional[torch.Tensor]  # [S] int64 CPU copy of the sampled tokens (non-blocking on CUDA)
    done: Optional[torch.cuda.Event]  # recorded after the step's last device work (CUDA only)
    result: ModelRunnerOutput  # prompt logprobs are filled in at launch


class ModelRunner:
    def __init__(self, model, hf_config, device: torch.device, dtype: torch.dtype, num_kv_blocks: int,
                 block_size: int, eos_token_ids: list[int], use_triton_attention: bool = True,
                 tokenizer=None) -> None:
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.vocab_size = hf_config.vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.use_triton_attention = use_triton_attention
        self.sampler = Sampler()
        # grammar state of structured-output requests (xgrammar loads on the first one)
        self.structured = StructuredOutputManager(tokenizer, self.vocab_size, self.eos_token_ids)
        self.kv_caches = self._allocate_kv_cache(num_kv_blocks)
        self.cuda_graphs = None  # a CUDAGraphRunner, set by the engine on CUDA unless enforce_eager
        self._staging_sets = [StagingBuffer(pin=device.type == "cuda") for _ in range(NUM_STAGING_SETS)]
        self._num_launched = 0
        # the last step's sampled tokens on the device, and each sampling request's row there
        self._last_sampled: Optional[torch.Tensor] = None
        self._last_sampled_rows: dict[str, int] = {}
        # ... and its host copy with the event after which it is valid (grammars read it)
        self._last_host_tokens: Optional[torch.Tensor] = None
        self._last_done: Optional[torch.cuda.Event] = None
        self.step_timer = None  # the engine's StepTimer when NANOVLLM_STEP_TIMING=1

    # ------------------------------------------------------------------ KV cache
    @staticmethod
    def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype) -> int:
        from nanovllm.models.llama import head_dim_of

        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        per_token = 2 * hf_config.num_hidden_layers * num_kv_heads * head_dim_of(hf_config)
        return per_token * block_size * torch.tensor([], dtype=dtype).element_size()

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        caches = []
        for attn in self.model.attention_layers():
            shape = (num_blocks, attn.num_kv_heads, self.block_size, attn.head_dim)
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.k_cache, attn.v_cache = k, v
            caches.append((k, v))
        return caches

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = to_device_async(torch.tensor([p[0] for p in pairs]), self.device)
        dst = to_device_async(torch.tensor([p[1] for p in pairs]), self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    # ------------------------------------------------------------------ inputs
    def _staging(self) -> StagingBuffer:
        """This step's host buffer, alternating between sets.

        Reuse is safe: set i is refilled two launches later, and by then the engine has
        resolved the step that last used it, which waits for all of its device work.
        """
        return self._staging_sets[self._num_launched % NUM_STAGING_SETS]

    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        items = sched.scheduled
        num_seqs = len(items)
        num_tokens = sum(it.num_new_tokens for it in items)
        max_blocks = max(len(it.block_ids) for it in items)
        tokens, seqs = (num_tokens,), (num_seqs,)
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
        })
        input_ids, positions, slot_mapping = host["input_ids"], host["positions"], host["slot_mapping"]
        query_start_loc, seq_lens, block_tables = host["query_start_loc"], host["seq_lens"], host["block_tables"]
        query_start_loc[0] = 0
        logits_indices, sample_requests, prompt_spans = [], [], []
        pending_dst, pending_src = [], []
        t = 0
        for i, it in enumerate(items):
            req, n, start = it.request, it.num_new_tokens, it.start_position
            end = start + n
            blocks = it.block_ids
            block_tables[i, : len(blocks)] = blocks
            block_tables[i, len(blocks) :] = 0  # the buffer is reused: no stale block ids
            if n == 1:  # decode: scalar writes, no temporary arrays
                if start < req.num_known_tokens:
                    input_ids[t] = req.token_id_at(start)
                else:  # sampled by the step still in flight
                    input_ids[t] = 0
                    pending_dst.append(t)
                    pending_src.append(self._pending_row(req))
                positions[t] = start
                slot_mapping[t] = blocks[start // bs] * bs + start % bs
            else:
                if end > req.num_known_tokens:  # scheduler invariant: pending tokens are decoded alone
                    raise RuntimeError(f"request {req.request_id}: a {n}-token chunk covers a pending token")
                input_ids[t : t + n] = req.token_ids_slice(start, end)
                pos = np.arange(start, end, dtype=np.int64)  # [n]
                positions[t : t + n] = pos
                slot_mapping[t : t + n] = block_tables[i, pos // bs].astype(np.int64) * bs + pos % bs
            query_start_loc[i + 1] = t + n
            seq_lens[i] = end
            if req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens:
                prompt_spans.append((req, t, min(end, req.num_prompt_tokens) - start, start))
            if it.needs_sample:
                logits_indices.append(t + n - 1)
                sample_requests.append(req)
            t += n
        num_sample, num_pending = len(logits_indices), len(pending_dst)
        host["logits_indices"][:num_sample] = logits_indices
        host["pending_dst"][:num_pending] = pending_dst
        host["pending_src"][:num_pending] = pending_src
        max_query_len = int(np.diff(query_start_loc).max())
        dev = staging.to_device(self.device)  # the step's one host-to-device copy
        ctx = ForwardContext(
            positions=dev["positions"],
            slot_mapping=dev["slot_mapping"],
            query_start_loc=dev["query_start_loc"],
            seq_lens=dev["seq_lens"],
            block_tables=dev["block_tables"],
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            num_seqs=num_seqs,
            query_start_loc_cpu=query_start_loc.tolist() if self.device.type == "cpu" else None,
            seq_lens_cpu=seq_lens.tolist() if self.device.type == "cpu" else None,
            use_triton=self.use_triton_attention,
        )
        input_ids_dev = dev["input_ids"]
        if num_pending:
            # input_ids[dst] = last step's sampled tokens[src], on the device (no host sync)
            src = self._last_sampled.index_select(0, dev["pending_src"][:num_pending])
            input_ids_dev.index_copy_(0, dev["pending_dst"][:num_pending], src)
        return StepInputs(
            input_ids=input_ids_dev,
            ctx=ctx,
            # increasing row indices: as many as rows means every row (a decode step), no gather
            logits_indices=None if num_sample == num_tokens else dev["logits_indices"][:num_sample],
            sample_requests=sample_requests,
            prompt_logprob_spans=prompt_spans,
        )

    def _pending_row(self, req) -> int:
        row = self._last_sampled_rows.get(req.request_id)
        if row is None:  # internal invariant (engine/scheduler bookkeeping), never user input
            raise RuntimeError(f"request {req.request_id} has a pending token but the last step did not sample it")
        return row

    # ------------------------------------------------------------------ execute
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results (the synchronous engine loop)."""
        return self.resolve(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        """Enqueue one step's device work: block copies, forward, logits, sampling.

        Returns without waiting for the device, except for prompt logprobs (rare; they are
        read from hidden states that a CUDA graph's next replay would overwrite).
        """
        self.copy_blocks(sched.blocks_to_copy)
        inputs = self.prepare_inputs(sched)
        self._num_launched += 1
        if self.step_timer:
            self.step_timer.mark("prepare_inputs")
        hidden = self._forward(inputs)  # [T, hidden]
        result = ModelRunnerOutput(sampled_token_ids={})
        if inputs.prompt_logprob_spans:
            self._prompt_logprobs(hidden, inputs, result)
        reqs = inputs.sample_requests
        out = host_tokens = None
        if reqs:
            logits = self.model.compute_logits(hidden, inputs.logits_indices)  # [S, V], sampler upcasts
            batch = SamplingBatch.build(
                params=[r.sampling_params for r in reqs],
                prompt_token_ids=[r.prompt_array for r in reqs],
                output_token_ids=[r.output_token_ids for r in reqs],
                eos_token_ids=self.eos_token_ids,
                vocab_size=logits.shape[-1],
                device=logits.device,
                num_output_tokens=[r.num_output_tokens + r.num_pending_tokens for r in reqs],
            )
            # host work while the device runs the forward: the grammars' token bitmasks
            self._grammar_bitmask(reqs, batch, logits.device)
            out = self.sampler(logits, batch)
            self._last_sampled = out.sampled_token_ids  # [S]: the next step's pending tokens
            self._last_sampled_rows = {r.request_id: i for i, r in enumerate(reqs)}
            host_tokens = out.sampled_token_ids.to("cpu", non_blocking=True)  # the step's one device->host copy
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        if reqs:
            self._last_host_tokens, self._last_done = host_tokens, done
        return LaunchedStep(reqs, out, host_tokens, done, result)

    def _grammar_bitmask(self, reqs, batch: SamplingBatch, device: torch.device) -> None:
        """Fill the bitmask rows of structured-output requests into `batch` (nothing for other batches).

        Runs after this step's forward is queued. A grammar must accept a request's previous
        token before masking the next; with async scheduling that token may still be pending
        (sampled by the step launched just before): its value is read from that step's host
        copy, waiting for that step only; the device already has this step's forward to run.
        """
        specs = [r.sampling_params.structured_outputs for r in reqs]
        if all(s is None for s in specs):
            return
        outputs = []
        waited = False
        for r, spec in zip(reqs, specs):
            tokens = r.output_token_ids
            if spec is not None and r.num_pending_tokens:
                if r.num_pending_tokens > 1:  # engine invariant: steps before the last one are resolved
                    raise RuntimeError(f"request {r.request_id} has {r.num_pending_tokens} tokens in flight")
                if not waited and self._last_done is not None:
                    self._last_done.synchronize()
                    waited = True
                tokens = tokens + [int(self._last_host_tokens[self._pending_row(r)])]
            outputs.append(tokens)
        filled = self.structured.fill_bitmask([r.request_id for r in reqs], specs, outputs)
        if filled is not None:
            bitmask, rows = filled
            batch.grammar_bitmask = to_device_async(torch.from_numpy(bitmask), device)  # [R, W] int32
            batch.grammar_rows = to_device_async(torch.tensor(rows, dtype=torch.int64), device)  # [R]

    def resolve(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step and turn its sampled tokens (and logprobs) into host values."""
        if step.done is not None:
            step.done.synchronize()
        result = step.result
        if not step.sample_requests:
            return result
        reqs, out = step.sample_requests, step.sampler_output
        tokens = step.host_tokens.tolist()
        result.sampled_token_ids = {r.request_id: tok for r, tok in zip(reqs, tokens)}
        if out.sampled_logprobs is not None:
            self._collect_logprobs(reqs, tokens, out, result)
        return result

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(inputs):
            return self.cuda_graphs.run(inputs)
        return self.model(inputs.input_ids, inputs.ctx.positions, inputs.ctx)

    # ------------------------------------------------------------------ logprobs
    def _collect_logprobs(self, reqs, tokens, out, result: ModelRunnerOutput) -> None:
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
            result.logprobs[req.request_id] = entry

    def _prompt_logprobs(self, hidden, inputs: StepInputs, result: ModelRunnerOutput) -> None:
        """Logprob of each prompt token given the ones before it (first token: None)."""
        for req, offset, count, first_pos in inputs.prompt_logprob_spans:
            # rows predicting prompt positions first_pos+1 .. first_pos+count (within the prompt)
            positions = [p for p in range(first_pos, first_pos + count) if p + 1 < req.num_prompt_tokens]
            entries = [None] if first_pos == 0 else []
            result.prompt_logprobs[req.request_id] = (first_pos, entries)
            if not positions:
                continue
            rows = torch.arange(offset, offset + len(positions), device=hidden.device)
            logits = self.model.compute_logits(hidden, rows).float()  # [P, V]
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
