"""Request: one sequence's state inside the engine (torch-free).

The scheduler thinks in tokens: `num_computed_tokens` (tokens whose K/V are in the cache)
catches up with `num_tokens` (prompt + generated). A prefill is a request far behind, a
decode is a request one token behind; preemption sets it back to 0.
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import PromptThenOutputTokens


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()  # EOS, stop token or stop string
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self._finished  # set once per member below: asked several times per request per step

    @property
    def finish_reason(self) -> Optional[str]:
        return self._finish_reason  # set once per member below, like _finished


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
for _status in RequestStatus:
    _status._finished = _status in _FINISHED
    _status._finish_reason = _FINISH_REASON.get(_status)


@dataclass
class Request(PromptThenOutputTokens):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: min(params.max_tokens, max_model_len - prompt_len)
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    # n > 1: children share the prompt's blocks; `parent_id`/`index` place the output.
    parent_id: Optional[str] = None
    index: int = 0

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prefix-cache hit at first admission
    num_preemptions: int = 0
    stop_reason: Optional[object] = None  # matched stop string or stop token id
    # block hashes of full blocks, extended as blocks fill (used by the prefix cache)
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already checked into the prefix cache
    # n > 1: fork into this many completions once the prompt (but its last token) is cached
    pending_fork: int = 0
    # async scheduling: tokens sampled by launched steps whose values have not reached the
    # host yet (0, 1, or 2 while the next step is being launched)
    num_pending_tokens: int = 0
    # what the worker already holds of this request (engine/step_builder.py): -1 = nothing
    # (never sent, or dropped at preemption); else how many output tokens and blocks it has
    num_outputs_sent: int = -1
    num_blocks_sent: int = 0

    @functools.cached_property
    def reads_token_values(self) -> bool:
        """Whether sampling this request's next token needs the previous token's value on the host:
        penalties count it, a grammar's matcher must accept it (the engine's verified params never change)."""
        params = self.sampling_params
        return params.uses_penalties or params.structured_outputs is not None

    @functools.cached_property
    def prompt_array(self) -> np.ndarray:
        """The prompt as int64 array, made once (penalties read it every step)."""
        return np.asarray(self.prompt_token_ids, dtype=np.int64)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens, counting the pending ones (what the scheduler plans with)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
