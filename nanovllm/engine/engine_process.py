"""EngineProcessClient: the LLMEngine in a process of its own, seen through LLMEngine's interface.

    server process                                      engine process (engine_core_proc.py)
    AsyncLLMEngine's engine thread
      add_request / abort_request ── commands pipe ──►  LLMEngine: schedule, step, detokenize,
      step()  ◄── reader thread ◄──── results pipe ───  stop strings; one StepBatch per step

Why: in one process the engine's host work (scheduling, input building, output processing,
detokenization) and the HTTP layer (uvicorn, SSE framing of every stream) share one GIL,
and each waits up to the interpreter's switch interval (5 ms) for the other. Here the engine
steps on its own GIL; the server's process only checks and tokenizes requests and frames
responses. vLLM's V1 puts its EngineCore in a background process for the same reason.

The client implements the part of LLMEngine that AsyncLLMEngine uses:
- `add_request` runs the engine's own checks here (request_checks.py, with the engine's
  tokenizer, context and KV-cache size), so a bad request raises ValueError/TypeError in the
  caller, then sends the tokenized request; nothing waits for the engine process.
- `step()` blocks (GIL released) until the engine process's next StepBatch arrives and returns
  its DELTA RequestOutputs; `wake()` (the caller has new commands) makes it return [] at once,
  so adds and aborts are not held up behind a long step. Outputs of a request id that was aborted and reused are told
  apart by the command numbers (`seq`).
- `stats()` is the engine's snapshot sent with every batch (also after aborts while idle).
- The engine process dying (killed, crashed, failed to start) is noticed by the reader thread
  at once (its pipe reaches EOF): `failure` says why and the failure callbacks run, as the
  tensor-parallel executor's do when a worker dies.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from nanovllm.config import EngineConfig
from nanovllm.engine.engine_core_proc import run_engine_core
from nanovllm.engine.engine_ipc import (AbortRequests, AddRequest, EngineFailed, EngineReady, Shutdown, StepBatch,
                                        decode_output)
from nanovllm.engine.input_processor import InputProcessor, PromptType
from nanovllm.engine.request_checks import RequestChecker
from nanovllm.engine.structured_output import StructuredOutputManager
from nanovllm.loading import model_info as model_info_lib
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.spawn import main_module_not_rerun

logger = logging.getLogger("nanovllm")

# step() returns [] when woken (the caller has commands to send) or, as a safety net, after this long
IDLE_POLL_S = 1.0
SHUTDOWN_JOIN_S = 30.0  # the engine process gets this long to stop its workers after Shutdown, then is killed
DEATH_REPORT_WAIT_S = 1.0  # after EOF: how long to wait for the process's exit code
# Capacity asked for the results pipe (Linux's default is 64 KiB, ~8 steps of 64 streams): the
# engine process blocks in send() only when the server's process lags this far behind.
RESULTS_PIPE_BYTES = 1 << 20


class EngineProcessDied(RuntimeError):
    """The engine process ended while the engine ran (killed, crashed, or failed to start)."""


class EngineStepError(RuntimeError):
    """A step raised in the engine process; `running_request_ids()` names the requests it ran."""


@dataclass
class _Live:
    seq: int  # the AddRequest's command number
    prompt: Optional[str]
    prompt_token_ids: list[int]


StepRecord = tuple[float, float, dict]  # (t_start, t_end, stats) of one step, monotonic seconds


class EngineProcessClient:
    """See the module docstring. `stats`, `failure`, `wake`, `add_failure_callback` and
    `compile_structured_outputs` are thread-safe; one thread (AsyncLLMEngine's engine thread)
    calls the rest."""

    def __init__(self, config: EngineConfig) -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        commands_r, self._commands = ctx.Pipe(duplex=False)
        self._results, results_w = ctx.Pipe(duplex=False)
        _widen_pipe(self._results)
        alive_r, self._alive = ctx.Pipe(duplex=False)
        level = logging.getLogger("nanovllm").getEffectiveLevel()
        # not daemonic: a tensor-parallel engine process starts worker processes of its own
        self.process = ctx.Process(target=run_engine_core, name="nanovllm-engine-core",
                                   args=(config, commands_r, results_w, alive_r, level))
        with main_module_not_rerun():
            self.process.start()
        for conn in (commands_r, results_w, alive_r):
            conn.close()
        # before multiprocessing's own exit hook, which would join the (non-daemonic) process forever
        atexit.register(self._stop_process)
        try:
            ready = self._wait_ready()
            self._init_frontend(ready)
        except BaseException:
            self._stop_process()
            raise
        self._seq = itertools.count(1)
        self._live: dict[str, _Live] = {}  # engine thread only
        self._cond = threading.Condition()
        self._batches: deque[StepBatch] = deque()  # guarded by _cond
        self._woken = False  # guarded by _cond
        self._failure: Optional[str] = None
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        self._closing = False
        self._stashed: Optional[EngineStepError] = None  # a failure to raise at the next step()
        self._running_at_failure: set[str] = set()
        self._step_records: list[StepRecord] = []
        self._stats = dict(ready.stats)
        self._reader = threading.Thread(target=self._read, name="nanovllm-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ start-up
    def _wait_ready(self) -> EngineReady:
        ready = multiprocessing.connection.wait([self._results, self.process.sentinel])
        message = None
        if self._results in ready:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                pass
        if isinstance(message, EngineReady):
            return message
        if isinstance(message, EngineFailed):
            raise message.error
        self.process.join(DEATH_REPORT_WAIT_S)
        raise EngineProcessDied(f"{describe_exit(self.process)} while starting")

    def _init_frontend(self, ready: EngineReady) -> None:
        """What the server's process needs of the engine: the tokenizer and the request checks."""
        cfg = ready.config
        self.config = cfg
        self.source = ready.source
        self.hf_config = ready.hf_config
        self.max_model_len = ready.max_model_len
        self.default_sampling_values = dict(ready.default_sampling_values)
        self.tokenizer = None
        if not cfg.skip_tokenizer_init:
            self.tokenizer = model_info_lib.load_tokenizer(ready.source, cfg.tokenizer, cfg.trust_remote_code)
        vocab_size = ready.hf_config.vocab_size
        self.input_processor = InputProcessor(
            self.tokenizer, vocab_size, ready.max_model_len, cfg.max_num_seqs, ready.num_kv_blocks, cfg.block_size,
            cfg.max_num_batched_tokens, cfg.enable_chunked_prefill, sliding_window=ready.kv_sliding_window)
        structured = (StructuredOutputManager(self.tokenizer, vocab_size, ready.eos_token_ids)
                      if self.tokenizer is not None else None)
        self.checker = RequestChecker(self.input_processor, vocab_size, structured)
        logger.info("nanovllm: the engine runs in process %d", ready.pid)

    # ------------------------------------------------------------------ LLMEngine's interface
    def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> str:
        """Check the request here (ValueError/TypeError as LLMEngine's) and send it to the engine process."""
        if not isinstance(request_id, str):
            raise TypeError("request_id must be a string")
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        checked = self.checker.check(prompt, params)
        if arrival_time is None:
            arrival_time = time.monotonic()
        seq = next(self._seq)
        processed = checked.prompt
        self._send(AddRequest(seq, request_id, {"prompt": processed.prompt,
                                                "prompt_token_ids": processed.prompt_token_ids},
                              checked.params, arrival_time))
        self._live[request_id] = _Live(seq, processed.prompt, processed.prompt_token_ids)
        return request_id

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Check a grammar here (ValueError with .param); thread-safe."""
        self.checker.compile_structured_outputs(params)

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            self._live.pop(rid, None)
        self._send(AbortRequests(next(self._seq), ids))  # sent even when empty: it ends a failed step's pause

    def has_unfinished_requests(self) -> bool:
        return bool(self._live) or self._stashed is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._live)

    def running_request_ids(self) -> set[str]:
        """The requests the engine process ran in its latest failed step."""
        return set(self._running_at_failure)

    def step(self) -> list[RequestOutput]:
        """The DELTA outputs of the engine's steps since the last call (waits up to IDLE_POLL_S for one)."""
        if self._stashed is not None:
            error, self._stashed = self._stashed, None
            raise error
        with self._cond:
            if not self._batches and self._failure is None and not self._woken:
                self._cond.wait(IDLE_POLL_S)
            self._woken = False
            batches = list(self._batches)
            self._batches.clear()
            failure = self._failure
        if not batches and failure is not None:
            raise EngineProcessDied(failure)
        outputs: list[RequestOutput] = []
        failed, errors = set(), []
        for batch in batches:
            if batch.stepped:
                self._step_records.append((batch.t_start, batch.t_end, batch.stats))
            outputs += self._decode(batch)
            if batch.failure is not None:
                failed.update(batch.failure.request_ids)
                errors.append(batch.failure.error)
        if errors:
            self._running_at_failure = failed
            error = EngineStepError("; ".join(errors))
            if not outputs:
                raise error
            self._stashed = error  # deliver what the engine made first
        return outputs

    def wake(self) -> None:
        """Make a waiting (or the next) step() return at once; thread-safe."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def take_step_records(self) -> list[StepRecord]:
        """(t_start, t_end, stats) of the engine process's steps returned since the last call."""
        records, self._step_records = self._step_records, []
        return records

    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        self._failure_callbacks.append(callback)

    def shutdown(self) -> None:
        """Stop the engine process (it stops its workers); idempotent."""
        self._closing = True
        try:
            self._commands.send(Shutdown(next(self._seq)))
        except (OSError, ValueError):
            pass
        self._stop_process(SHUTDOWN_JOIN_S)

    # ------------------------------------------------------------------ internals
    def _send(self, command) -> None:
        try:
            self._commands.send(command)
        except (OSError, ValueError) as e:  # the process is gone: the reader thread finds out why
            with self._cond:
                self._cond.wait_for(lambda: self._failure is not None, DEATH_REPORT_WAIT_S + 1.0)
            raise EngineProcessDied(self._failure or f"the engine process is gone ({e!r})") from None

    def _decode(self, batch: StepBatch) -> list[RequestOutput]:
        outputs = []
        for record in batch.outputs:
            rid = record[0]
            live = self._live.get(rid)
            if live is None or batch.applied < live.seq:  # aborted, or an earlier request of the same id
                continue
            out = decode_output(record, live.prompt, live.prompt_token_ids)
            if out.finished:
                del self._live[rid]
            outputs.append(out)
        return outputs

    def _read(self) -> None:
        """Reader thread: stats at once, batches for step(); EOF = the process ended."""
        report = None
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, StepBatch):
                self._stats = message.stats
                if message.stepped or message.outputs or message.failure is not None:
                    with self._cond:
                        self._batches.append(message)
                        self._cond.notify()
            elif isinstance(message, EngineFailed):
                report = message
        if self._closing:
            return
        self.process.join(DEATH_REPORT_WAIT_S)
        why = describe_exit(self.process)
        if report is not None:
            why += f": {type(report.error).__name__}: {report.error}"
            logger.error("the engine process failed:\n%s", report.traceback)
        with self._cond:
            self._failure = why
            self._cond.notify_all()
        error = EngineProcessDied(why)
        for callback in list(self._failure_callbacks):
            try:
                callback(error)
            except Exception:  # the others still run
                logger.exception("engine failure callback raised")

    def _stop_process(self, join_s: float = 0.0) -> None:
        """Join the engine process for `join_s`, then kill it (it ignores SIGTERM); close the pipes."""
        atexit.unregister(self._stop_process)
        self._closing = True
        proc = self.process
        if proc.pid is not None:
            proc.join(join_s)
            if proc.is_alive():
                if join_s:
                    logger.warning("the engine process did not stop within %.0f s; killing it", join_s)
                proc.kill()
                proc.join()
        for conn in (self._commands, self._alive, self._results):
            conn.close()


def _widen_pipe(conn: multiprocessing.connection.Connection) -> None:
    """Ask for a RESULTS_PIPE_BYTES pipe buffer (Linux; elsewhere, or above the system's limit, the default stays)."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, RESULTS_PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


def describe_exit(proc: multiprocessing.process.BaseProcess) -> str:
    """'the engine process (pid 123) was killed by signal SIGKILL' (or exited with code N / stopped responding)."""
    code = proc.exitcode
    if code is None:
        how = "stopped responding"
    elif code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return f"the engine process (pid {proc.pid}) {how}"
