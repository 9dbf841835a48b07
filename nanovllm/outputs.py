"""Output objects with vLLM's names and shapes, so code can switch engines by changing an import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None  # 1 = most likely token
    decoded_token: Optional[str] = None


# One dict per position: token id -> Logprob (the chosen token plus the top alternatives).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Union[int, str, None] = None  # matched stop string or stop token id

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """time.monotonic() stamps of one request's life in the engine."""

    arrival_time: float  # when the caller submitted it (LLMEngine.add_request, or the async engine's caller)
    queued_time: Optional[float] = None  # when the engine added it to the scheduler's queue
    first_scheduled_time: Optional[float] = None  # when its first prefill chunk was scheduled
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = field(default=None, repr=False)
