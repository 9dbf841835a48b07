"""LLMEngine: the step loop that ties scheduler, model runner and detokenizer together.

    add_request(...)  -> validated Request(s) queued in the scheduler
    step()            -> schedule, run the model, update, detokenize, RequestOutputs
    abort_request(id) -> finished with "abort", blocks freed

One user request with n > 1 is one scheduler request until its prompt is cached, then
n completions (see Scheduler._fork_ready); RequestOutput groups them by index.

Async scheduling (default on CUDA): step() schedules and launches step N+1, then waits
for step N and returns its outputs, so the host's scheduling, input preparation,
detokenization and output building overlap the GPU's work. The scheduler plans each
decode's next token before its value is known (`Request.num_pending_tokens`); a request
that turns out to be finished has computed one token for nothing, which is discarded.
Steps whose sampling needs the previous token's value (penalties) wait for it first;
structured outputs get it inside the next launch, after its forward is queued.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch

from nanovllm.config import DEFAULT_CPU_KV_CACHE_TOKENS, EngineConfig
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.input_processor import InputProcessor, PromptType, invalid
from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.request import Request, RequestStatus
from nanovllm.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput
from nanovllm.loading import model_loader
from nanovllm.loading.resolve import resolve_model
from nanovllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.worker.model_runner import ModelRunner

logger = logging.getLogger("nanovllm")

# Without an explicit max_model_len, long-context models are capped to keep the
# rope table and the per-request KV check reasonable; users can raise it.
DEFAULT_MAX_MODEL_LEN_CAP = 32768
CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB of KV cache on CPU unless num_kv_blocks is given


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
        if not all(c.request.is_finished for c in self.completions.values()):
            return False
        # all n completions done, or the lone request ended before it forked (abort)
        return len(self.completions) == self.params.n or bool(self.completions[0].request.pending_fork)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        self.source = resolve_model(config.model, config.download_dir, config.revision)
        self.hf_config = model_loader.load_hf_config(self.source, config.trust_remote_code)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = model_loader.load_tokenizer(self.source, config.tokenizer, config.trust_remote_code)
        self.eos_token_ids = model_loader.eos_token_ids(self.source, self.hf_config, self.tokenizer)
        # the model's generation_config.json defaults (temperature, top_p, ...), as vLLM applies them
        self.default_sampling_values = model_loader.generation_defaults(self.source, config.generation_config)
        self.max_model_len = self._resolve_max_model_len()
        self.dtype = model_loader.resolve_dtype(config.dtype, self.hf_config, self.device)
        load_format = config.extra.get("load_format", "auto")
        self.model = model_loader.build_model(
            self.source, self.hf_config, self.device, self.dtype, self.max_model_len, load_format
        )
        self.cpu_fp16_weights = self.device.type == "cpu" and model_loader.maybe_pack_cpu_weights(
            self.model, config.cpu_weight_format, self.source, self.hf_config)
        if self.device.type == "cuda":
            # Small-batch decode GEMMs: Triton GEMV where it beats cuBLAS on this GPU and these
            # shapes (timed here, before the KV cache takes the free memory and before graphs).
            from nanovllm.kernels.gemv import GEMV_MAX_M, calibrate_gemv

            calibrate_gemv(self.model, self.device, max_m=min(GEMV_MAX_M, config.max_num_seqs))
        num_blocks = self._num_kv_blocks()
        self.runner = ModelRunner(
            self.model, self.hf_config, self.device, self.dtype, num_blocks, config.block_size,
            self.eos_token_ids, use_triton_attention=config.attention_backend != "torch",
            tokenizer=self.tokenizer,
        )
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max(config.max_num_batched_tokens, 1), self.max_model_len,
                            config.enable_chunked_prefill),
            self.kv,
        )
        self.input_processor = InputProcessor(
            self.tokenizer, self.hf_config.vocab_size, self.max_model_len, config.max_num_seqs,
            num_blocks, config.block_size,
        )
        if self.device.type == "cuda" and not config.enforce_eager:
            from nanovllm.worker.cuda_graphs import CUDAGraphRunner

            self.runner.cuda_graphs = CUDAGraphRunner(self.runner, config.max_num_seqs, self.max_model_len)
            self.runner.cuda_graphs.capture()
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda")
        self._in_flight: Optional[_InFlightStep] = None  # async scheduling: launched, not resolved
        self.states: dict[str, _RequestState] = {}
        self._counter = itertools.count()
        # NANOVLLM_STEP_TIMING=1: accumulate wall time per phase of a step (benchmarks)
        self.step_timer = StepTimer() if os.environ.get("NANOVLLM_STEP_TIMING") == "1" else None
        self.runner.step_timer = self.step_timer
        # totals for metrics
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_preemptions_total = 0
        logger.info(
            "nanovllm: %s on %s (%s), KV cache %d blocks x %d tokens = %d tokens, max_model_len %d, "
            "max concurrency %.1f full-length requests",
            self.source.name, self.device, str(self.dtype).replace("torch.", ""), num_blocks, config.block_size,
            num_blocks * config.block_size, self.max_model_len, num_blocks * config.block_size / self.max_model_len,
        )

    # ------------------------------------------------------------------ setup helpers
    def _resolve_max_model_len(self) -> int:
        model_max = getattr(self.hf_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN_CAP
        if self.config.max_model_len is None:
            return min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)
        if self.config.max_model_len > model_max:
            if not self.config.allow_long_max_model_len:
                raise ValueError(
                    f"max_model_len={self.config.max_model_len} is longer than the model's max_position_embeddings="
                    f"{model_max}: lower it, or pass allow_long_max_model_len=True (CLI: --allow-long-max-model-len) "
                    f"to use positions the model was not trained on")
            logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d "
                           "(allow_long_max_model_len=True)", self.config.max_model_len, model_max)
        return self.config.max_model_len

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        per_block = ModelRunner.kv_bytes_per_block(self.hf_config, cfg.block_size, self.dtype)
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type == "cpu":
            want_tokens = min(DEFAULT_CPU_KV_CACHE_TOKENS, cfg.max_num_seqs * self.max_model_len)
            return max(1, min(want_tokens // cfg.block_size, CPU_KV_CACHE_BYTES // per_block))
        from nanovllm.worker.memory import profile_num_kv_blocks

        return profile_num_kv_blocks(self, per_block)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Optional[SamplingParams] = None, arrival_time: Optional[float] = None) -> str:
        """Validate and queue a request. Raises ValueError/TypeError; the engine is untouched then."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = params.clone()  # the engine's own verified copy: later changes by the caller do not reach it
        if request_id is None:
            request_id = str(next(self._counter))
        if not isinstance(request_id, str):
            raise TypeError("request_id must be a string")
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        processed = self.input_processor.process_prompt(prompt)
        prompt_len = len(processed.prompt_token_ids)
        for field_name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = next((t for t in ids if t >= self.hf_config.vocab_size), None)
            if bad is not None:
                raise invalid(f"token id {bad} in {field_name} is outside the vocabulary "
                              f"[0, {self.hf_config.vocab_size})", field_name)
        self.compile_structured_outputs(params)  # bad specs fail here; a cache hit when precompiled
        max_tokens = self.input_processor.resolve_max_tokens(params, prompt_len)
        self.input_processor.check_fits(params, prompt_len, max_tokens)
        now = arrival_time if arrival_time is not None else time.monotonic()
        req = Request(
            request_id=request_id,
            prompt_token_ids=processed.prompt_token_ids,
            sampling_params=params,
            max_tokens=max_tokens,
            eos_token_ids=tuple(self.eos_token_ids),
            arrival_time=now,
            parent_id=request_id,
            pending_fork=params.n if params.n > 1 else 0,
        )
        state = _RequestState(request_id, processed.prompt, processed.prompt_token_ids, params,
                              metrics=RequestMetrics(arrival_time=now))
        state.completions[0] = self._new_completion(req)
        self.states[request_id] = state
        self.scheduler.add_request(req)
        self.num_prompt_tokens_total += prompt_len
        return request_id

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile (and cache) the grammar of `params`, if any; a bad spec raises ValueError/TypeError
        with .param = "structured_outputs". Thread-safe: AsyncLLMEngine calls it on its
        preprocessing threads first, so a slow compilation never stalls the engine's steps."""
        if params.structured_outputs is None:
            return
        if self.tokenizer is None:
            raise invalid("structured outputs need a tokenizer; this engine runs with skip_tokenizer_init=True",
                          "structured_outputs")
        try:
            self.runner.structured.validate(params.structured_outputs)
        except (ValueError, TypeError) as e:
            raise invalid(str(e), "structured_outputs", type(e)) from None

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
            result = self.runner.execute(sched)
            if timer:
                timer.mark("forward_sample_sync")
            return self._process_results(sched, result, advanced=False)

        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and previous.needs_token_values:
            outputs += self._resolve(previous)  # penalties read the previous token's value
            previous = None
        sched = self._schedule()
        if not sched.is_empty:
            launched = self.runner.launch(sched)
            self.scheduler.advance(sched)
            self._in_flight = _InFlightStep(sched, launched, _needs_token_values(sched))
        if previous is not None:
            outputs += self._resolve(previous)
        elif timer:
            timer.mark("forward_sample_sync")
            timer.mark("update_detok_outputs")
        return outputs

    def _schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        for child in sched.forked:
            self.states[child.parent_id].completions[child.index] = self._new_completion(child)
        self.num_preemptions_total += len(sched.preempted)
        if self.step_timer and not sched.is_empty:
            self.step_timer.mark("schedule")
        return sched

    def _resolve(self, step: "_InFlightStep") -> list[RequestOutput]:
        result = self.runner.resolve(step.launched)
        if self.step_timer:
            self.step_timer.mark("forward_sample_sync")
        return self._process_results(step.sched, result, advanced=True)

    def _process_results(self, sched: SchedulerOutput, result: ModelRunnerOutput,
                         advanced: bool) -> list[RequestOutput]:
        """Scheduler update, detokenization and stop strings, then the step's RequestOutputs."""
        timer = self.step_timer
        updated = self.scheduler.update(sched, result, advanced=advanced)
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
        outputs = self._outputs(touched)
        if timer:
            timer.mark("update_detok_outputs")
        return outputs

    def _append_logprobs(self, comp: _Completion, req: Request, token: int, result: ModelRunnerOutput) -> None:
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
        if state.params.structured_outputs is not None:
            self.runner.structured.release([c.request.request_id for c in state.completions.values()])

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
            metrics=dataclasses.replace(state.metrics),  # a snapshot: the engine keeps updating its own
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
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "preemptions_total": self.num_preemptions_total,
        }


@dataclass
class _InFlightStep:
    sched: SchedulerOutput
    launched: object  # the runner's LaunchedStep
    needs_token_values: bool  # a sampled request's next step reads this step's token value


def _needs_token_values(sched: SchedulerOutput) -> bool:
    """Whether a request sampled by this step needs the token's value on the host before its
    next step is scheduled: penalties count it. (Grammars need it too, but later: the model
    runner reads it from the previous step's host copy once the next forward is queued.)"""
    return any(it.needs_sample and it.request.sampling_params.uses_penalties for it in sched.scheduled)


class StepTimer:
    """Wall time per phase of engine steps: where a step's host time goes (benchmarks only).

    The engine and runner call `mark(phase)` at the end of each phase. The forward phase
    ends with the sampled tokens' copy to the host, so it includes waiting for the GPU.
    """

    PHASES = ("schedule", "prepare_inputs", "forward_sample_sync", "update_detok_outputs")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        self._last = 0.0

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now
        if phase == self.PHASES[-1]:
            self.steps += 1

    def summary(self) -> str:
        n = max(1, self.steps)
        return ", ".join(f"{k} {1e3 * v / n:.3f} ms" for k, v in self.totals.items()) + f" (per step, {n} steps)"


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return torch.device(device)
