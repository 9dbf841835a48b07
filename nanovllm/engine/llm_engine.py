"""LLMEngine: the step loop that ties scheduler, executor and detokenizer together.

    add_request(...)  -> validated Request(s) queued in the scheduler
    step()            -> schedule, hand the step to the executor (plain data, step_io.py),
                         update, detokenize, RequestOutputs
    abort_request(id) -> finished with "abort", blocks freed

The engine owns requests, scheduling, the KV block pool and text; the executor's worker(s)
own the model (worker/). The engine never imports layers, kernels or models.

One user request with n > 1 is one scheduler request until its prompt is cached, then
n completions (see Scheduler._fork_ready); RequestOutput groups them by index.

Async scheduling (default on CUDA): step() schedules and launches step N+1, then waits
for step N and returns its outputs, so the host's scheduling, input preparation,
detokenization and output building overlap the GPU's work. The scheduler plans each
decode's next token before its value is known (`Request.num_pending_tokens`); a request
that turns out to be finished has computed one token for nothing, which is discarded.
Steps whose sampling needs the previous token's value wait for it first: penalties count
it, and structured outputs' grammar matchers (engine/structured_output.py) accept it
before the engine fills the next step's token bitmasks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from nanovllm import envs
from nanovllm.config import EngineConfig
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.input_processor import InputProcessor, PromptType
from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.request_checks import RequestChecker
from nanovllm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from nanovllm.engine.step_builder import StepBuilder
from nanovllm.engine.step_timer import StepTimer
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.loading import model_info as model_info_lib
from nanovllm.loading.resolve import resolve_model
from nanovllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.step_io import StepOutput
from nanovllm.worker.executor import Executor

logger = logging.getLogger("nanovllm")


@dataclass
class _Completion:
    """Per-completion (index) state of a user request."""

    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    sent_tokens: int = 0  # for DELTA outputs


@dataclass
class _RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: dict[int, _Completion] = field(default_factory=dict)
    prompt_logprobs: Optional[list] = None
    metrics: RequestMetrics = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        for c in self.completions.values():
            if not c.request.status.is_finished:
                return False
        # all n completions done, or the lone request ended before it forked (abort)
        return len(self.completions) == self.params.n or bool(self.completions[0].request.pending_fork)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        overrides = envs.config_overrides()  # benchmark A/B switches, read once here
        if overrides:
            logger.info("nanovllm: settings from the environment: %s", overrides)
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.source = resolve_model(config.model, config.download_dir, config.revision)
        self.hf_config = model_info_lib.load_hf_config(self.source, config.trust_remote_code)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = model_info_lib.load_tokenizer(self.source, config.tokenizer, config.trust_remote_code)
        self.eos_token_ids = model_info_lib.eos_token_ids(self.source, self.hf_config, self.tokenizer)
        # the model's generation_config.json defaults (temperature, top_p, ...), as vLLM applies them
        self.default_sampling_values = model_info_lib.generation_defaults(self.source, config.generation_config)
        self.max_model_len = model_info_lib.resolve_max_model_len(self.hf_config, config.max_model_len,
                                                                  config.allow_long_max_model_len)
        # grammars of structured-output requests: compiled at admission, matched here, and each
        # step's token bitmasks sent to the worker in StepInput (xgrammar loads on the first one)
        self.structured = (StructuredOutputManager(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
                           if self.tokenizer is not None else None)
        self.model_info = model_info_lib.ModelInfo(self.source, self.hf_config, self.max_model_len,
                                                   tuple(self.eos_token_ids))
        self.step_timer = StepTimer() if config.step_timing else None
        # the worker(s): model build, weights, calibration, KV sizing and allocation, graphs
        self.executor = Executor.create(config, self.model_info, step_timer=self.step_timer)
        info = self.executor.info
        num_blocks = self.executor.num_kv_blocks
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 sliding_window=info.kv_sliding_window)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max(config.max_num_batched_tokens, 1), self.max_model_len,
                            config.enable_chunked_prefill, config.max_prefill_tokens_while_decoding),
            self.kv,
        )
        self.step_builder = StepBuilder(self.scheduler, self.structured)
        self.input_processor = InputProcessor(
            self.tokenizer, self.hf_config.vocab_size, self.max_model_len, config.max_num_seqs,
            num_blocks, config.block_size, config.max_num_batched_tokens, config.enable_chunked_prefill,
            sliding_window=info.kv_sliding_window,
        )
        self.checker = RequestChecker(self.input_processor, self.hf_config.vocab_size, self.structured)
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else info.is_cuda)
        self._in_flight: Optional[_InFlightStep] = None  # async scheduling: launched, not resolved
        self.states: dict[str, _RequestState] = {}
        self._counter = itertools.count()
        # totals for metrics
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_preemptions_total = 0
        self.last_step_tokens = (0, 0, 0)  # (tokens, of which prefill, sequences) of the latest scheduled step
        logger.info(
            "nanovllm: %s on %s (%s), KV cache %d blocks x %d tokens = %d tokens, max_model_len %d, "
            "max concurrency %.1f full-length requests",
            self.source.name, info.device, info.dtype, num_blocks, config.block_size,
            num_blocks * config.block_size, self.max_model_len, num_blocks * config.block_size / self.max_model_len,
        )

    def shutdown(self) -> None:
        """Release the executor's workers (the engine cannot step afterwards)."""
        self.executor.shutdown()

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Optional[SamplingParams] = None, arrival_time: Optional[float] = None) -> str:
        """Validate and queue a request. Raises ValueError/TypeError; the engine is untouched then."""
        if request_id is None:
            request_id = str(next(self._counter))
        if not isinstance(request_id, str):
            raise TypeError("request_id must be a string")
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        checked = self.checker.check(prompt, params)
        processed, params = checked.prompt, checked.params
        prompt_len = len(processed.prompt_token_ids)
        now = arrival_time if arrival_time is not None else time.monotonic()
        req = Request(
            request_id=request_id,
            prompt_token_ids=processed.prompt_token_ids,
            sampling_params=params,
            max_tokens=checked.max_tokens,
            eos_token_ids=tuple(self.eos_token_ids),
            arrival_time=now,
            parent_id=request_id,
            pending_fork=params.n if params.n > 1 else 0,
        )
        state = _RequestState(request_id, processed.prompt, processed.prompt_token_ids, params,
                              metrics=RequestMetrics(arrival_time=now, queued_time=time.monotonic()))
        state.completions[0] = self._new_completion(req)
        self.states[request_id] = state
        self.scheduler.add_request(req)
        self.num_prompt_tokens_total += prompt_len
        return request_id

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile (and cache) the grammar of `params`, if any; a bad spec raises ValueError/TypeError
        with .param = "structured_outputs". Thread-safe: AsyncLLMEngine calls it on its
        preprocessing threads first, so a slow compilation never stalls the engine's steps."""
        self.checker.compile_structured_outputs(params)

    def _new_completion(self, req: Request) -> _Completion:
        params = req.sampling_params
        return _Completion(
            request=req,
            detokenizer=IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params),
            logprobs=[] if params.logprobs is not None else None,
        )

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        """Finish requests with reason 'abort' and free their blocks. Unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            state = self.states.pop(rid, None)
            if state is None:
                continue
            ids = [c.request.request_id for c in state.completions.values() if not c.request.is_finished]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            self._release_grammars(state)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def running_request_ids(self) -> set[str]:
        """Ids (as given to add_request) of the requests in the running batch."""
        return {r.parent_id or r.request_id for r in self.scheduler.running}

    @property
    def failure(self) -> Optional[str]:
        """Why no step can run any more (a worker process died), else None."""
        return self.executor.failure

    def add_failure_callback(self, callback) -> None:
        """`callback(error)` runs on a watchdog thread when a worker process dies."""
        self.executor.add_failure_callback(callback)

    def get_num_unfinished_requests(self) -> int:
        return len(self.states)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """One engine step; returns the RequestOutputs of the requests that changed.

        With async scheduling the outputs are those of the step launched by the previous
        call (the first call after idling returns none, and an idle engine returns the
        last step's).
        """
        timer = self.step_timer
        if timer:
            timer.start()
        if not self.async_scheduling:
            sched = self._schedule()
            if sched.is_empty:
                return self._outputs(set())
            result = self.executor.execute(self._build(sched))
            if timer:
                timer.mark("resolve")
            return self._process_results(sched, result, advanced=False)

        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        resolved = previous is not None
        if previous is not None and previous.needs_token_values:
            outputs += self._resolve(previous)  # penalties read the previous token's value
            previous = None
        sched = self._schedule()
        if not sched.is_empty:
            launched = self.executor.launch(self._build(sched))
            self.scheduler.advance(sched)
            self._in_flight = _InFlightStep(sched, launched, _needs_token_values(sched))
            if timer:
                timer.mark("launch_rest")
        if previous is not None:
            outputs += self._resolve(previous)
        elif timer and not resolved:
            timer.mark(timer.LAST_PHASE)  # nothing to resolve (the first step after idling): count the step
        return outputs

    def _build(self, sched: SchedulerOutput):
        step = self.step_builder.build(sched)
        if self.step_timer:
            self.step_timer.mark("build_step")
        return step

    def _schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        self.last_step_tokens = (sched.num_batched_tokens, sched.num_prefill_tokens, len(sched.scheduled))
        if sched.admitted:
            now = time.monotonic()
            for req in sched.admitted:
                state = self.states.get(req.parent_id)
                if state is not None and state.metrics.first_scheduled_time is None:
                    state.metrics.first_scheduled_time = now
        for child in sched.forked:
            self.states[child.parent_id].completions[child.index] = self._new_completion(child)
        self.num_preemptions_total += len(sched.preempted)
        if self.step_timer and not sched.is_empty:
            self.step_timer.mark("schedule")
        return sched

    def _resolve(self, step: "_InFlightStep") -> list[RequestOutput]:
        result = self.executor.resolve(step.launched)
        if self.step_timer:
            self.step_timer.mark("resolve")
        return self._process_results(step.sched, result, advanced=True)

    def _process_results(self, sched: SchedulerOutput, result: StepOutput,
                         advanced: bool) -> list[RequestOutput]:
        """Scheduler update, detokenization and stop strings, then the step's RequestOutputs."""
        timer = self.step_timer
        updated = self.scheduler.update(sched, result, advanced=advanced)
        if timer:
            timer.mark("update")
        touched: set[str] = set()
        now = time.monotonic()
        for req in updated:
            state = self.states.get(req.parent_id)
            if state is None:
                continue
            touched.add(state.request_id)
            comp = state.completions[req.index]
            token = req.output_token_ids[-1]
            self.num_generation_tokens_total += 1
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
            if comp.logprobs is not None:
                self._append_logprobs(comp, req, token, result)
            # EOS / stop token ids were caught by the scheduler; their text is left out
            stop = comp.detokenizer.update([token], stop_terminated=req.status == RequestStatus.FINISHED_STOPPED)
            if stop is not None:
                req.stop_reason = stop
                if not req.is_finished:
                    self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                else:
                    req.status = RequestStatus.FINISHED_STOPPED
        scheduled = {item.request.request_id: item.request for item in sched.scheduled}
        for rid, (first_pos, entries) in result.prompt_logprobs.items():
            state = self.states.get(scheduled[rid].parent_id)
            if state is None:
                continue
            if first_pos == 0 or state.prompt_logprobs is None:
                state.prompt_logprobs = []
            state.prompt_logprobs.extend(self._decorate(e) for e in entries)
        if timer:
            timer.mark("detokenize")
        outputs = self._outputs(touched)
        if timer:
            timer.mark("outputs")
        return outputs

    def _append_logprobs(self, comp: _Completion, req: Request, token: int, result: StepOutput) -> None:
        entry = result.logprobs.get(req.request_id)
        if entry is None:
            return
        comp.cumulative_logprob += entry[token].logprob
        comp.logprobs.append(self._decorate(entry))

    def _decorate(self, entry: Optional[dict[int, Logprob]]):
        if entry is None or self.tokenizer is None:
            return entry
        for tid, lp in entry.items():
            lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
        return entry

    def _release_grammars(self, state: _RequestState) -> None:
        if state.params.structured_outputs is not None and self.structured is not None:
            self.structured.release([c.request.request_id for c in state.completions.values()])

    # ------------------------------------------------------------------ outputs
    def _outputs(self, touched: set[str]) -> list[RequestOutput]:
        """RequestOutputs of the requests that changed this step (finishing only happens there)."""
        outputs = []
        now = time.monotonic()
        for rid in touched:
            state = self.states[rid]
            finished = state.finished
            kind = state.params.output_kind
            if kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            if finished:
                state.metrics.finished_time = now
                del self.states[rid]
                self._release_grammars(state)
            outputs.append(self._make_output(state, finished, kind))
        return outputs

    def _make_output(self, state: _RequestState, finished: bool, kind: RequestOutputKind) -> RequestOutput:
        delta = kind == RequestOutputKind.DELTA
        completions = []
        for idx in range(state.params.n):
            comp = state.completions.get(idx)
            if comp is None:
                # not forked yet (or aborted before the fork)
                reason = state.completions[0].request.status.finish_reason if finished else None
                completions.append(CompletionOutput(idx, "", [], finish_reason=reason))
                continue
            req = comp.request
            if delta:
                text = comp.detokenizer.get_new_text(finished=req.is_finished)
                token_ids = req.output_token_ids[comp.sent_tokens :]
                logprobs = comp.logprobs[comp.sent_tokens :] if comp.logprobs is not None else None
                comp.sent_tokens = len(req.output_token_ids)
            else:
                text = comp.detokenizer.output_text
                token_ids = list(req.output_token_ids)
                logprobs = list(comp.logprobs) if comp.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=idx,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=comp.cumulative_logprob if comp.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=req.status.finish_reason,
                    stop_reason=req.stop_reason,
                )
            )
        prompt_logprobs = None
        if state.prompt_logprobs is not None and (not delta or not state.prompt_logprobs_sent):
            prompt_logprobs = state.prompt_logprobs
            state.prompt_logprobs_sent = True
        first = state.completions[0].request
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=first.num_cached_prompt_tokens,
            metrics=_snapshot(state.metrics),  # the engine keeps updating its own
        )

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv.usage,
            "num_free_blocks": self.kv.num_free_blocks,
            "num_blocks": self.kv.num_blocks,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "prefix_cache_hit_rate": self.kv.hit_rate,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "preemptions_total": self.num_preemptions_total,
            # the latest scheduled step (the request timeline logs them)
            "last_step_num_tokens": self.last_step_tokens[0],
            "last_step_num_prefill_tokens": self.last_step_tokens[1],
            "last_step_num_seqs": self.last_step_tokens[2],
        }


@dataclass
class _InFlightStep:
    sched: SchedulerOutput
    launched: object  # the executor's handle of the launched step
    needs_token_values: bool  # a sampled request's next step reads this step's token value


def _snapshot(metrics: RequestMetrics) -> RequestMetrics:
    """A copy of the metrics' current values (what dataclasses.replace gives, at a fraction of its
    cost: streamed requests get one per step)."""
    snap = object.__new__(RequestMetrics)
    snap.__dict__.update(metrics.__dict__)
    return snap


def _needs_token_values(sched: SchedulerOutput) -> bool:
    """Whether a request sampled by this step needs the token's value on the host before its
    next step is built: penalties count it, and a grammar's matcher must accept it before the
    engine fills that request's next token bitmask."""
    for it in sched.scheduled:
        if it.needs_sample and it.request.reads_token_values:
            return True
    return False
