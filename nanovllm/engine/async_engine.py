"""AsyncLLMEngine: the LLMEngine driven by one background thread, for asyncio servers.

    event loop (any number of coroutines)             engine thread (the only one touching LLMEngine)
    add_request()/abort() ──► commands (list + Condition) ──► engine.add_request / abort_request
    RequestStream (asyncio.Queue) ◄── loop.call_soon_threadsafe ◄── engine.step() DELTA outputs

- Every request streams DELTA outputs (new text, token ids and logprobs of each step).
- A bad request (ValueError/TypeError from LLMEngine.add_request) raises in the caller of
  `add_request`/`generate`; the engine loop never sees it again.
- Closing a stream early (break + aclose, task cancelled, client gone) aborts the request,
  which frees its KV blocks on the engine thread's next iteration.
- If `step()` raises, the requests that were running fail with `RequestFailedError`, the
  error is logged, and the loop goes on serving the others. If the engine cannot even abort
  them, it is marked dead: every stream fails and new requests raise `EngineDeadError`.
- A tensor-parallel worker process that dies kills the engine at once, busy or idle (the
  executor's failure callback); `on_dead` callbacks then run (the server shuts down).
- With `EngineConfig.engine_process` the engine itself runs in a process of its own and the
  engine thread drives an EngineProcessClient (engine/engine_process.py), which has the same
  interface: same streams, errors and drain, and the engine's host work off this process's GIL.
  The engine process dying is handled as a worker dying.
- With nothing to do the thread waits on a condition variable (no polling).
- Each step's outputs reach an event loop in one `call_soon_threadsafe` (one wake-up per loop
  per step, however many streams). With `coalesce_outputs`, a stream whose consumer fell behind
  hands it the waiting outputs merged into one (engine/output_merge.py): same content, fewer
  chunks to frame and send when the event loop is the bottleneck.
- Several requests queued by one `add_requests` call reach the engine thread together, so
  they are all admitted in the same step (as far as seats and KV blocks allow).
- Tokenization, chat templates and grammar compilation (structured outputs; xgrammar
  releases the GIL) run on a small thread pool (`preprocess`, `tokenize`), never on the event
  loop (one huge prompt must not stall /health and every other stream) nor on the engine
  thread (it would stall every step): the engine's add_request then finds the grammar cached.
- Graceful drain: `stop_accepting` refuses new requests, `abort_all` ends the live ones with
  EngineDeadError (a 503 / an SSE error event on the server).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Protocol, Sequence, TypeVar, Union

from nanovllm.config import EngineConfig
from nanovllm.engine.engine_process import EngineProcessClient
from nanovllm.engine.input_processor import PromptType
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.output_merge import merge_delta_outputs
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("nanovllm")

# Consecutive failed steps after which every request is failed (a fault that is not tied
# to the running batch would otherwise repeat forever).
MAX_CONSECUTIVE_STEP_FAILURES = 3
SHUTDOWN_JOIN_TIMEOUT_S = 30.0
# Threads for tokenization / chat templates (HF fast tokenizers release the GIL while encoding):
# at most 2, and one core always left to the event loop and the engine thread.
MAX_PREPROCESS_THREADS = 2

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or an unrecoverable error); no request can run."""


class RequestFailedError(RuntimeError):
    """The engine raised while running this request; the request was aborted."""


class RequestObserver(Protocol):
    """Per-request timing hooks, called on the engine thread (keep them cheap and thread-safe)."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, output: RequestOutput, e2e_s: float, num_generation_tokens: int) -> None: ...


@dataclass
class _Stream:
    """Engine-thread bookkeeping of one live request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: asyncio.Future
    last_token_time: Optional[float] = None
    num_generation_tokens: int = 0


class RequestStream:
    """Async iterator over one request's DELTA RequestOutputs. Closing it early aborts the request."""

    def __init__(self, engine: "AsyncLLMEngine", request_id: str, queue: asyncio.Queue,
                 coalesce: bool = False) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._done = False
        self._coalesce = coalesce
        self._held = None  # an item taken from the queue while coalescing, for the next call

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            try:
                item = await self._queue.get()
            except BaseException:  # cancelled while waiting: the consumer is gone
                self.abort()
                raise
        if self._coalesce:
            item = self._take_waiting(item)
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def _take_waiting(self, item):
        """`item` merged with the outputs already queued behind it (an error is kept for the next call)."""
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._held = nxt
                break
            item = merge_delta_outputs(item, nxt)
        return item

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Abort the request unless it already finished (idempotent, callable from any thread)."""
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()

    def __del__(self) -> None:  # dropped without being drained or closed: do not leave it running
        if not self._done:
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    """Thread-safe, asyncio-facing wrapper of LLMEngine (see the module docstring)."""

    def __init__(self, engine: Union[LLMEngine, EngineProcessClient], coalesce_outputs: bool = False) -> None:
        if not isinstance(coalesce_outputs, bool):
            raise TypeError(f"coalesce_outputs must be True or False, got {coalesce_outputs!r}")
        self.coalesce_outputs = coalesce_outputs
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.model_name = engine.source.name
        self.vocab_size = engine.hf_config.vocab_size
        self.default_sampling_values = dict(engine.default_sampling_values)
        self._cond = threading.Condition()
        self._commands: list[tuple] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._closed: Optional[str] = None  # why new requests are refused (graceful drain)
        self._dead: Optional[BaseException] = None
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._observers: list[RequestObserver] = []
        self._step_observers: list = []  # fn(t_start, t_end, stats) after each step, on the engine thread
        self._ids = itertools.count()
        self._consecutive_failures = 0
        self._stats = dict(engine.stats())
        self._dead_callbacks: list = []
        self._remote = isinstance(engine, EngineProcessClient)  # steps in a process of its own
        engine.add_failure_callback(self._on_executor_failure)
        threads = max(1, min(MAX_PREPROCESS_THREADS, len(os.sched_getaffinity(0)) - 1))
        self._preprocess = ThreadPoolExecutor(threads, thread_name_prefix="nanovllm-preprocess")
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, coalesce_outputs: bool = False) -> "AsyncLLMEngine":
        """The engine in this process, or in its own process with `config.engine_process`."""
        engine = EngineProcessClient(config) if config.engine_process else LLMEngine(config)
        try:
            return cls(engine, coalesce_outputs)
        except BaseException:
            engine.shutdown()
            raise

    # ------------------------------------------------------------------ public (event loop side)
    @property
    def is_running(self) -> bool:
        """Alive and accepting requests (False while draining)."""
        return self._thread.is_alive() and self._dead is None and not self._stopping and self._closed is None

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead

    def on_dead(self, callback) -> None:
        """`callback(error)` runs once when the engine dies (on the engine thread; at once if dead)."""
        self._dead_callbacks.append(callback)
        if self._dead is not None:
            callback(self._dead)

    def add_observer(self, observer: RequestObserver) -> None:
        self._observers.append(observer)

    def add_step_observer(self, fn) -> None:
        """Call fn(t_start, t_end, stats) on the engine thread after each step (monotonic seconds; keep it cheap)."""
        self._step_observers.append(fn)

    def remove_observer(self, observer: RequestObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    async def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                          request_id: Optional[str] = None,
                          arrival_time: Optional[float] = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises what LLMEngine.add_request raises (ValueError/TypeError for bad input), or
        EngineDeadError. Outputs are always DELTA, whatever `params.output_kind` says. A text
        prompt is tokenized on the preprocessing threads first.
        """
        [stream] = await self.add_requests([(prompt, params, request_id)], arrival_time)
        return stream

    async def add_requests(self, requests: Sequence[tuple[PromptType, Optional[SamplingParams], Optional[str]]],
                           arrival_time: Optional[float] = None) -> list[RequestStream]:
        """Queue (prompt, params, request_id or None) requests together; their streams, in order.

        The engine thread takes them in one go, so all of them are admitted in the same step
        as far as seats and KV blocks allow (one request of 64 prompts is not 64 steps of
        admission). All or nothing: when one is refused, the accepted ones are aborted and the
        first error is raised.
        """
        self._check_accepting()
        arrival = time.monotonic() if arrival_time is None else arrival_time
        loop = asyncio.get_running_loop()
        commands = []
        for prompt, params, request_id in requests:
            params = SamplingParams() if params is None else params
            if not isinstance(params, SamplingParams):
                raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
            params = params.replace(output_kind=RequestOutputKind.DELTA)
            request_id = f"async-{next(self._ids)}" if request_id is None else request_id
            commands.append(("add", request_id, prompt, params, arrival, _Stream(loop, asyncio.Queue(),
                                                                                  loop.create_future())))
        commands = await self._pretokenize(commands)
        await self._precompile(commands)
        self._check_accepting()
        if not self._submit(*commands):
            raise EngineDeadError("the engine is shutting down")
        ids = [c[1] for c in commands]
        try:
            results = await asyncio.gather(*(c[5].accepted for c in commands), return_exceptions=True)
        except asyncio.CancelledError:
            for rid in ids:
                self.abort(rid)  # commands run in order: these aborts come after the adds
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for rid, r in zip(ids, results):
                if not isinstance(r, BaseException):
                    self.abort(rid)
            raise errors[0]
        return [RequestStream(self, c[1], c[5].queue, self.coalesce_outputs) for c in commands]

    async def _pretokenize(self, commands: list[tuple]) -> list[tuple]:
        """Text prompts -> {"prompt", "prompt_token_ids"} on the preprocessing threads."""
        texts = [(i, c[2]) for i, c in enumerate(commands) if _prompt_text(c[2]) is not None]
        if not texts or self.tokenizer is None:
            return commands
        ids = await self.tokenize([_prompt_text(p) for _, p in texts])
        commands = list(commands)
        for (i, prompt), prompt_ids in zip(texts, ids):
            c = commands[i]
            commands[i] = (c[0], c[1], {"prompt": _prompt_text(prompt), "prompt_token_ids": prompt_ids}, *c[3:])
        return commands

    async def _precompile(self, commands: list[tuple]) -> None:
        """Grammars of structured requests compiled (cached) on the preprocessing threads; a bad
        one raises here, as add_request would."""
        params = [c[3] for c in commands if c[3].structured_outputs is not None]
        if params:
            compile_one = self.engine.compile_structured_outputs  # thread-safe (cache under a lock)
            await self.preprocess(lambda: [compile_one(p) for p in params])

    def _check_accepting(self) -> None:
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine is not running ({self._dead or 'shut down'})")
        if self._closed is not None:
            raise EngineDeadError(self._closed)

    # ------------------------------------------------------------------ preprocessing (off the event loop)
    def check_text(self, text: str, param: str = "prompt") -> None:
        """Cheap checks of a text before it is tokenized (type, length bound, valid Unicode)."""
        self.engine.input_processor.check_text(text, param)

    @property
    def max_prompt_chars(self) -> Optional[int]:
        """Longest text that could fit in the context (None: no bound known)."""
        return self.engine.input_processor.max_prompt_chars

    async def preprocess(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run fn (tokenization, a chat template, decoding) on the preprocessing threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._preprocess, functools.partial(fn, *args, **kwargs))

    async def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True,
                       param: str = "prompt") -> list[list[int]]:
        """Token ids of each text (checked first, as `check_text`), tokenized off the event loop."""
        for text in texts:
            self.check_text(text, param)
        tokenize = self.engine.input_processor.tokenize  # reads only the tokenizer: thread-safe
        return await self.preprocess(lambda: [tokenize(t, add_special_tokens, param) for t in texts])

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Stream one request's DELTA outputs; aborts it when the consumer stops early."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when unknown or finished). Safe from any thread."""
        self._submit(("abort", request_id))

    def stats(self) -> dict:
        """Snapshot of LLMEngine.stats() taken by the engine thread after its latest step (an engine
        process sends its own after each step and after aborts: thread-safe to read at once)."""
        snap = dict(self.engine.stats() if self._remote else self._stats)
        snap["engine_alive"] = self.is_running
        return snap

    def stop_accepting(self, reason: str) -> None:
        """Graceful drain, first half: new requests raise EngineDeadError(reason), /health says
        not running; requests already accepted carry on."""
        self._closed = reason

    def abort_all(self, reason: str) -> None:
        """Graceful drain, second half: every live request fails with EngineDeadError(reason) and
        its blocks are freed (safe from any thread)."""
        self._submit(("abort_all", reason))

    def shutdown(self, timeout: float = SHUTDOWN_JOIN_TIMEOUT_S) -> None:
        """Stop the engine thread; live streams fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._remote:
            self.engine.wake()
        self._preprocess.shutdown(wait=False, cancel_futures=True)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():  # a step still runs: its workers must stay up until it ends
                logger.warning("the engine thread did not stop within %.0f s; its workers stay up", timeout)
            else:
                self.engine.shutdown()  # release the executor's worker processes (tensor parallelism)

    # ------------------------------------------------------------------ engine thread
    def _submit(self, *commands: tuple) -> bool:
        """Queue commands for the engine thread (taken together); False once shutdown started."""
        with self._cond:
            if self._stopping:
                return False
            self._commands.extend(commands)
            self._cond.notify()
        if self._remote:
            self.engine.wake()  # the engine thread may be waiting in step() for the engine process
        return True

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._stopping and not (
                    self._dead is None and engine.has_unfinished_requests()
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            if self._dead is None and engine.has_unfinished_requests():
                self._step()
            else:
                self._snapshot()
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _on_executor_failure(self, error: BaseException) -> None:
        """A worker process died (called on the executor's watchdog thread): wake the engine thread."""
        with self._cond:
            self._commands.append(("die", error))
            self._cond.notify()

    def _apply(self, command: tuple) -> None:
        if command[0] == "die":
            if self._dead is None:
                self._die(command[1])
            return
        if command[0] == "abort_all":
            live = list(self._streams)
            try:
                self.engine.abort_request(live)
            except Exception as e:  # never user input: the engine's state is broken
                self._die(e)
                return
            self._fail(live, EngineDeadError(command[1]))
            return
        if command[0] == "abort":
            rid = command[1]
            stream = self._streams.pop(rid, None)
            if stream is None:
                return
            try:
                self.engine.abort_request(rid)
            except Exception as e:  # never user input: the engine's state is broken
                self._die(e)
            return
        _, rid, prompt, params, arrival, stream = command
        if self._dead is not None:
            _call(stream.loop, _set_exception, stream.accepted, EngineDeadError(f"the engine died: {self._dead!r}"))
            return
        if rid in self._streams:
            _call(stream.loop, _set_exception, stream.accepted, ValueError(f"request id {rid!r} is already in use"))
            return
        try:
            self.engine.add_request(rid, prompt, params, arrival_time=arrival)
        except Exception as e:  # bad input: goes back to the caller only
            _call(stream.loop, _set_exception, stream.accepted, e)
            return
        self._streams[rid] = stream
        if not _call(stream.loop, _set_result, stream.accepted, True):
            self._streams.pop(rid, None)
            self.engine.abort_request(rid)

    def _step(self) -> None:
        t_start = time.monotonic()
        try:
            outputs = self.engine.step()
            t_end = time.monotonic()
        except Exception as e:
            if self.engine.failure is not None:  # a worker process (or the engine process) is gone: nothing can run
                self._die(e)
                return
            logger.exception("engine step failed; failing the requests it was running")
            self._consecutive_failures += 1
            self._fail_running(e)
            self._snapshot()
            return
        # an engine process reports its own steps' times (none when step() only waited)
        steps = self.engine.take_step_records() if self._remote else [(t_start, t_end, None)]
        if steps:
            self._consecutive_failures = 0
        self._snapshot()  # before delivering, so a client that got its answer sees fresh stats
        for fn in self._step_observers:
            for step_start, step_end, step_stats in steps:
                try:
                    fn(step_start, step_end, self._stats if step_stats is None else step_stats)
                except Exception:  # a timing hook must never break serving
                    logger.exception("step observer failed")
        self._dispatch(outputs)

    def _snapshot(self) -> None:
        try:
            self._stats = dict(self.engine.stats())
        except Exception:  # stats are best effort
            logger.exception("engine stats failed")

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._observe(stream, out)
            if out.finished:
                del self._streams[out.request_id]
            batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():  # one wake-up per event loop per step
            if not _call(loop, _deliver, items):
                gone = [out.request_id for _, out in items if not out.finished]
                self.engine.abort_request(gone)

    def _observe(self, stream: _Stream, out: RequestOutput) -> None:
        if not self._observers:
            return
        m = out.metrics
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        try:
            if new_tokens and m is not None and m.last_token_time is not None:
                stream.num_generation_tokens += new_tokens
                if stream.last_token_time is None:
                    for obs in self._observers:
                        obs.on_first_token(m.first_token_time - m.arrival_time)
                else:
                    for obs in self._observers:
                        obs.on_inter_token(m.last_token_time - stream.last_token_time)
                stream.last_token_time = m.last_token_time
            if out.finished and m is not None:
                end = m.finished_time if m.finished_time is not None else time.monotonic()
                for obs in self._observers:
                    obs.on_finished(out, end - m.arrival_time, stream.num_generation_tokens)
        except Exception:  # metrics must never break serving
            logger.exception("request observer failed")

    def _fail_running(self, error: Exception) -> None:
        """After a failed step: fail the requests that were in the batch, keep the waiting ones."""
        running = self.engine.running_request_ids()
        affected = [rid for rid in self._streams if rid in running]
        if not affected or self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            affected = list(self._streams)  # the fault is not tied to the batch: fail everything
        # unknown to us (e.g. added directly on the LLMEngine): abort too, or the loop would spin
        affected += [rid for rid in running if rid not in self._streams]
        try:
            self.engine.abort_request(affected)
        except Exception as e:
            self._die(e)
            return
        exc = RequestFailedError(f"the engine failed while running this request: {error!r}")
        self._fail(affected, exc)

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, exc))
        for loop, items in batches.items():
            _call(loop, _deliver, items)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
        for command in commands:  # adds that never ran
            if command[0] == "add":
                stream = command[5]
                _call(stream.loop, _set_exception, stream.accepted, exc)
        self._fail(list(self._streams), exc)

    def _die(self, error: BaseException) -> None:
        logger.error("nanovllm engine is dead: %r", error)
        self._dead = error
        self._fail_all(EngineDeadError(f"the engine died: {error!r}"))
        for callback in self._dead_callbacks:
            try:
                callback(error)
            except Exception:  # the others still run
                logger.exception("engine-dead callback failed")


def _prompt_text(prompt: PromptType) -> Optional[str]:
    """The text of a prompt that still needs tokenizing, else None."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    return None


# ---------------------------------------------------------------------- event-loop callbacks
def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Run fn(*args) on loop; False when the loop is closed (its consumers are gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
