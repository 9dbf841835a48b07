"""Per-step timeline of a worker: what each step computed, its GPU time, and the bytes it had to move.

Why. A throughput number says how far the engine is from the hardware, not where the time
goes. Over a run, steps differ by orders of magnitude (an 8k-token prefill, a batch-256
decode, a batch-1 decode in the tail), so one profile of one step cannot tell. This records,
for every step, what it was (prefill / mixed / decode, requests, tokens, keys read) next
to what it cost: the GPU time between two CUDA events around the step's device work, and the
GPU's idle time before it (the host was late). Each step's floor is the larger of its bytes
over the memory bandwidth and its FLOPs over the peak GEMM rate (`nanovllm/bench/step_timeline.py`
sums the gap to the floor over the run).

No host sync is added: the events are read when the engine resolves the step, after it has
waited on the step's last event anyway (which completes both of this step's events and the
previous step's). On CPU there are no events; the times are the host's launch-to-resolve.

Bytes of a step: the weights once (`param_bytes`), every scheduled request's K/V up to its
context length (what attention reads), and the new tokens' K/V (what the KV store writes).
FLOPs: 2 x dense parameters per new token, 2 x LM-head parameters per sampled row, and
4 x heads x head_dim per (query, visible key) pair per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from nanovllm.step_io import StepInput

KIND_PREFILL, KIND_MIXED, KIND_DECODE = "prefill", "mixed", "decode"


@dataclass
class StepRecord:
    """One step of the timeline (times in milliseconds; `gpu_ms`/`gap_ms` filled at resolve)."""

    step: int
    kind: str  # "prefill" (only prompt chunks), "mixed" (chunks and decodes) or "decode"
    num_seqs: int
    num_tokens: int  # new tokens computed
    num_prefill_tokens: int  # of which prompt tokens (chunks that have not reached the prompt's end)
    context_tokens: int  # keys attention reads: sum of context lengths after the step
    num_sampled: int
    bytes: int  # weights + K/V read + K/V written
    flops: float
    launch_s: float = 0.0  # host clock at launch (perf_counter), for host-side analysis
    gpu_ms: float = 0.0
    gap_ms: float = 0.0  # the GPU's idle time between the previous step's end and this step's start

    def floor_ms(self, bandwidth: float, peak_flops: float) -> float:
        """The step's lower bound: bytes over bandwidth or FLOPs over the peak rate, whichever is larger."""
        return 1e3 * max(self.bytes / bandwidth, self.flops / peak_flops)


@dataclass(frozen=True)
class ModelCost:
    """What one token of one request costs in bytes and FLOPs (constants of the model and cache)."""

    param_bytes: int  # weights a step reads (tied embeddings counted once)
    kv_bytes_per_token: int  # K and V of one token over all layers, in the cache's dtype
    dense_params: int  # parameters every token multiplies with (no embedding table, no LM head)
    lm_head_params: int  # multiplied with each sampled row
    attn_flops_per_pair: int  # 4 * num_heads * head_dim * num_layers: QK^T and PV of one (query, key)

    @classmethod
    def of(cls, model, param_bytes: int, kv_bytes_per_token: int) -> "ModelCost":
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        lm_head = getattr(model, "lm_head", None)
        unique = {id(p): p for p in model.parameters()}
        skip = {id(m.weight) for m in (embed, lm_head) if m is not None and hasattr(m, "weight")}
        dense = sum(p.numel() for k, p in unique.items() if k not in skip)
        layers = model.attention_layers()
        pair = sum(4 * a.num_heads * a.head_dim for a in layers)
        lm = lm_head.weight.numel() if lm_head is not None and hasattr(lm_head, "weight") else 0
        for m in model.modules():  # quantized linears keep their weight in buffers (a 0-size placeholder)
            if getattr(m, "quantized", False):
                if m is lm_head:
                    lm = m.in_features * m.out_features
                else:
                    dense += m.in_features * m.out_features
        return cls(param_bytes, kv_bytes_per_token, dense, lm, pair)

    def step(self, num_new: list[int], starts: list[int], num_sampled: int) -> tuple[int, float, int, int]:
        """(bytes, flops, context tokens, new tokens) of one step's requests."""
        context = new = pairs = 0
        for n, s in zip(num_new, starts):
            context += s + n
            new += n
            pairs += n * s + n * (n + 1) // 2  # causal: token j of the chunk sees s + j + 1 keys
        nbytes = self.param_bytes + (context + new) * self.kv_bytes_per_token
        flops = 2.0 * self.dense_params * new + 2.0 * self.lm_head_params * num_sampled + self.attn_flops_per_pair * pairs
        return nbytes, flops, context, new


class StepTimeline:
    """Records a StepRecord per launched step; `begin` at launch, `end` after the step's
    device work is enqueued, `finish` once the step has been waited for (resolve)."""

    def __init__(self, cost: ModelCost, device: torch.device) -> None:
        self.cost = cost
        self.cuda = device.type == "cuda"
        self.records: list[StepRecord] = []
        self._prev_end = None  # the last finished step's end event (CUDA) or host time (CPU)
        self._count = 0

    def reset(self) -> None:
        """Forget the steps so far (e.g. the warm-up's); the next step has no gap before it."""
        self.records = []
        self._prev_end = None
        self._count = 0

    def begin(self, step: StepInput, requests) -> tuple[StepRecord, object]:
        """Describe the step and mark its start (a CUDA event on the current stream)."""
        num_new, starts = step.num_new_tokens, step.start_positions
        prefill = decode = 0
        prefill_tokens = 0
        for rid, n, s in zip(step.req_ids, num_new, starts):
            if s < requests[rid].num_prompt_tokens:
                prefill += 1
                prefill_tokens += n
            else:
                decode += 1
        kind = KIND_DECODE if not prefill else (KIND_PREFILL if not decode else KIND_MIXED)
        num_sampled = sum(step.needs_sample)
        nbytes, flops, context, new = self.cost.step(num_new, starts, num_sampled)
        record = StepRecord(self._count, kind, len(step.req_ids), new, prefill_tokens, context, num_sampled,
                            nbytes, flops, launch_s=time.perf_counter())
        self._count += 1
        start = None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        return record, start

    def end_event(self) -> Optional[torch.cuda.Event]:
        """The event that closes a step (the step's `done` event, with timing enabled)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def finish(self, record: StepRecord, start, end) -> None:
        """Fill in the times of a step whose end event has completed (called from resolve)."""
        if self.cuda:
            record.gpu_ms = start.elapsed_time(end)
            record.gap_ms = max(0.0, self._prev_end.elapsed_time(start)) if self._prev_end is not None else 0.0
            self._prev_end = end
        else:
            now = time.perf_counter()
            record.gpu_ms = 1e3 * (now - start)
            record.gap_ms = max(0.0, 1e3 * (start - self._prev_end)) if self._prev_end is not None else 0.0
            self._prev_end = now
        self.records.append(record)
