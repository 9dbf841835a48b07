"""The engine <-> worker step contract, as plain data (picklable; no live engine objects).

The engine's scheduler decides; a worker (in this process or, for tensor parallelism, in
another one) holds the model and one state per live request. Each step the engine sends a
`StepInput` and gets a `StepOutput` back. Like vLLM v1's SchedulerOutput the input is
incremental, so its size is O(scheduled requests), not O(tokens of their histories):

- a request the worker has not seen yet (first scheduled, an n > 1 completion just forked,
  or resumed after preemption) comes once as a `NewRequest`, with its prompt, sampling
  settings, whole block table and the tokens it already generated;
- afterwards only what changed: the blocks appended to its table and the tokens it
  generated since it was last sent (known on the engine's host by then);
- finished and preempted requests are named so the worker drops their state first
  (preempted ones come back later as new requests).

The scheduled requests of the step are parallel lists in batch order. A decode token whose
value is not on the host yet (async scheduling: sampled by the step still in flight) is
simply not among the sent tokens; the worker takes it from that step's sampled tensor on
the device. Structured outputs come as token bitmasks filled by the engine's grammar
matchers, one row per constrained sampled request (the engine resolves the step in flight
before such a request samples again, so its matcher has seen every token). This module imports nothing of nanovllm but sampling_params and outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from nanovllm.outputs import Logprob
from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np

LogprobEntry = dict[int, Logprob]  # the sampled or prompt token and its top-k alternatives


class PromptThenOutputTokens:
    """A request's token ids by position: its prompt, then its generated tokens. Both sides of
    the contract keep these two lists (the engine's Request, the worker's RequestState) and
    read them by position without concatenating."""

    __slots__ = ()
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def num_known_tokens(self) -> int:
        """Prompt + generated tokens whose values this side holds (async scheduling: a token still
        being sampled on the device is not among them)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


@dataclass
class NewRequest:
    """Everything a worker needs to hold a request it has not seen."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]  # the whole block table at this step
    output_token_ids: list[int] = field(default_factory=list)  # generated so far (resumed after preemption)


@dataclass
class StepInput:
    """One engine step for the worker: what to compute, and how each request's state changed."""

    # ---- the scheduled requests, in batch order (parallel lists)
    req_ids: list[str]
    num_new_tokens: list[int]  # tokens computed this step per request, from its start position
    start_positions: list[int]  # first position computed (the request's computed-token count)
    needs_sample: list[bool]  # this chunk reaches the request's last token: sample the next one
    # ---- state changes, applied in this order before the step runs
    finished_req_ids: list[str] = field(default_factory=list)  # drop (finished or aborted)
    preempted_req_ids: list[str] = field(default_factory=list)  # drop (they come back as new requests)
    new_requests: list[NewRequest] = field(default_factory=list)
    new_token_ids: dict[str, list[int]] = field(default_factory=dict)  # req id -> tokens generated since last sent
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)  # req id -> blocks appended since last sent
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) KV blocks, before the forward
    num_batched_tokens: int = 0
    # ---- structured outputs: the engine's grammar matchers' token masks for this step's sampling
    grammar_bitmask: Optional["np.ndarray"] = None  # [R, ceil(V / 32)] int32, bit j of word w = token 32 w + j allowed
    grammar_rows: list[int] = field(default_factory=list)  # [R] each bitmask row's index among the sampled rows

    @property
    def num_scheduled(self) -> int:
        return len(self.req_ids)


@dataclass
class StepOutput:
    """What a step hands back: one sampled token per scheduled request that sampled."""

    sampled_token_ids: dict[str, int]  # request_id -> token
    logprobs: dict[str, LogprobEntry] = field(default_factory=dict)  # request_id -> sampled + top-k alternatives
    # request_id -> (first prompt position covered, per-position entries); chunked prefill
    # delivers them in pieces, a recompute after preemption starts again at 0
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once its model is loaded and its KV cache allocated."""

    num_kv_blocks: int
    device: str  # e.g. "cuda:0", "cpu"
    dtype: str  # e.g. "bfloat16"
    kv_bytes_per_block: int  # all layers, K and V
    param_bytes: int  # this rank's parameters, tied weights counted once (what its decode step reads)
    cuda_graphs: bool  # decode batches replay captured CUDA graphs
    cpu_fp16_weights: bool  # CPU GEMMs read fp16-packed weights
    tensor_parallel_size: int = 1  # ranks the model is split over (the other fields: rank 0's)
    kv_cache_dtype: str = ""  # e.g. "bfloat16", "float8_e4m3fn"
    # every attention layer's keys end this far back (the widest window): the KV cache frees
    # blocks before it; None when any layer attends to the whole context
    kv_sliding_window: Optional[int] = None
    # what one token's decode step reads: as param_bytes, but a sparse MoE layer counts only
    # top_k of its E experts (0 = not reported: use param_bytes)
    active_param_bytes: int = 0
    param_bytes_unquantized: int = 0  # the same weights in the model dtype (memory report); 0 = unknown
    quantization: str = ""  # e.g. "int4 (224 layers)", "" = none

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")
