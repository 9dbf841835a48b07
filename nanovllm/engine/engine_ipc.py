"""What the server's process and the engine process (engine_process.py) send each other.

    server process ── AddRequest / AbortRequests / Shutdown ──►  engine process
                   ◄── EngineReady once, then one StepBatch per step (or EngineFailed)

Messages are typed dataclasses pickled by multiprocessing Connections. A step's outputs
travel as plain tuples (`encode_outputs` / `decode_outputs`), not as RequestOutput objects:
pickle handles tuples of str/int/float in C, dataclasses through Python-level __reduce_ex__
(64 RequestOutputs: ~0.3 ms to pickle and ~0.3 ms to unpickle on a 2-core CPU, tuples ~10x
less), and the server's half runs under the event loop's GIL. The prompt and its token ids
never travel back: the server's process keeps them from the request it sent.

    output record = (request_id, finished, completions, metrics, num_cached_tokens, prompt_logprobs)
    completion    = (index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason)
    metrics       = RequestMetrics's fields (METRIC_FIELDS), or None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from nanovllm.config import EngineConfig
from nanovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nanovllm.sampling_params import SamplingParams

# RequestMetrics's fields, in the order encode_outputs writes them (a test keeps the two in step)
METRIC_FIELDS = ("arrival_time", "queued_time", "first_scheduled_time", "first_token_time", "last_token_time",
                 "finished_time", "num_cached_tokens")


# ----------------------------------------------------------------------------- server -> engine
@dataclass(frozen=True)
class AddRequest:
    seq: int  # the command's number: outputs of an earlier request with the same id are told apart by it
    request_id: str
    prompt: dict  # {"prompt": text or None, "prompt_token_ids": [...]}: already tokenized and checked
    params: SamplingParams
    arrival_time: float  # time.monotonic() of the server's process (one clock for every process of a host)


@dataclass(frozen=True)
class AbortRequests:
    seq: int
    request_ids: list[str]


@dataclass(frozen=True)
class Shutdown:
    seq: int


# ----------------------------------------------------------------------------- engine -> server
@dataclass(frozen=True)
class EngineReady:
    """What the server's process needs to know of the engine that started (to check requests)."""

    config: EngineConfig  # with the NANOVLLM_* overrides applied
    source: Any  # loading.resolve's resolved model source (its .name is the model's name)
    hf_config: Any
    eos_token_ids: tuple[int, ...]
    default_sampling_values: dict
    max_model_len: int
    num_kv_blocks: int
    kv_sliding_window: Optional[int]
    stats: dict
    pid: int


@dataclass(frozen=True)
class StepFailure:
    """An engine step raised (or a request was refused after it left the server): the requests
    in `request_ids` are affected; the engine process waits for the server's verdict (an abort)
    before it steps again."""

    error: str  # repr of the exception
    request_ids: list[str]


@dataclass(frozen=True)
class StepBatch:
    """One engine step's DELTA outputs (or an idle snapshot: stepped False, no outputs)."""

    applied: int  # seq of the last command the engine process had applied before this step
    stepped: bool
    t_start: float
    t_end: float
    stats: dict
    outputs: list[tuple] = field(default_factory=list)  # encode_outputs' records
    failure: Optional[StepFailure] = None


@dataclass(frozen=True)
class EngineFailed:
    """The engine process is ending because of `error` (at start-up: the exception itself when it pickles)."""

    error: BaseException
    traceback: str = ""


# ----------------------------------------------------------------------------- output records
def encode_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    """RequestOutputs -> plain tuples (see the module docstring), prompts left out."""
    records = []
    for out in outputs:
        comps = tuple((c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason,
                       c.stop_reason) for c in out.outputs)
        m = out.metrics
        metrics = None if m is None else (m.arrival_time, m.queued_time, m.first_scheduled_time, m.first_token_time,
                                          m.last_token_time, m.finished_time, m.num_cached_tokens)
        records.append((out.request_id, out.finished, comps, metrics, out.num_cached_tokens, out.prompt_logprobs))
    return records


def decode_output(record: tuple, prompt: Optional[str], prompt_token_ids: list[int]) -> RequestOutput:
    """One record back into the RequestOutput the engine made, with the prompt the server kept."""
    request_id, finished, comps, metrics, num_cached_tokens, prompt_logprobs = record
    # positional: RequestOutput(request_id, prompt, prompt_token_ids, outputs, finished, prompt_logprobs,
    # num_cached_tokens, metrics), the fields' order (a test checks the round trip)
    return RequestOutput(request_id, prompt, prompt_token_ids, [CompletionOutput(*c) for c in comps], finished,
                         prompt_logprobs, num_cached_tokens, None if metrics is None else RequestMetrics(*metrics))
