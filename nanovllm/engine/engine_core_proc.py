"""The engine process: builds the LLMEngine and steps it without pause (engine_process.py starts it).

    loop: apply the server's commands (adds, aborts) -> step -> send the step's StepBatch

The server's process only pre- and post-processes HTTP; scheduling, input building,
sampling's host work, detokenization and stop strings all run here, on their own GIL.

- Grammars of structured requests compile on a thread here (xgrammar releases the GIL), so a
  slow compilation never stalls the steps; the request is added once its grammar is cached.
  (The server's process compiled the same grammar to check it: xgrammar's CompiledGrammar
  is bound to its tokenizer info, so it is not sent across.)
- A step that raises is reported with the running requests' ids; the loop then waits for
  the server's verdict (an AbortRequests) before it steps again, as the in-thread engine does.
- SIGINT/SIGTERM are ignored: the server's process owns the drain and ends this one with
  Shutdown. When the server's process dies, however abruptly, a pipe reaches EOF and this
  process exits (no orphan, and its tensor-parallel workers follow it the same way).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Optional

from nanovllm.config import EngineConfig
from nanovllm.engine.engine_ipc import (AbortRequests, AddRequest, EngineFailed, EngineReady, Shutdown, StepBatch,
                                        StepFailure, encode_outputs)
from nanovllm.engine.llm_engine import LLMEngine

logger = logging.getLogger("nanovllm")

EXIT_FAILED = 1
COMPILE_POLL_S = 0.005  # idle, with grammars compiling: how often to look whether one is done
TRACEBACK_LINES = 12


def run_engine_core(config: EngineConfig, commands: Connection, results: Connection, parent_alive: Connection,
                    log_level: int) -> None:
    """Entry point of the spawned engine process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("nanovllm").setLevel(log_level)  # the server's level (nanovllm's handler is set on import)
    threading.Thread(target=_exit_with_parent, args=(parent_alive,), name="nanovllm-parent-watch",
                     daemon=True).start()
    try:
        engine = LLMEngine(config)
        loop = EngineCoreLoop(engine, commands, results)
        engine.add_failure_callback(loop.on_worker_death)  # a tensor-parallel worker died, busy or idle
        info = engine.executor.info
        results.send(EngineReady(engine.config, engine.source, engine.hf_config, tuple(engine.eos_token_ids),
                                 dict(engine.default_sampling_values), engine.max_model_len,
                                 engine.executor.num_kv_blocks, info.kv_sliding_window, engine.stats(), os.getpid()))
    except BaseException as e:  # e.g. a bad model path: the server's process raises it as its own
        _report(results, e)
        _exit(EXIT_FAILED)
    try:
        _run_on_thread(loop.run)
    except BaseException as e:
        logger.exception("the engine process failed")
        loop.fail(e)
    try:
        engine.shutdown()
    finally:
        _exit(0)  # skip the interpreter's teardown of torch (seconds): the server waits for this exit


class EngineCoreLoop:
    """Commands in, one StepBatch out per step; see the module docstring."""

    def __init__(self, engine: LLMEngine, commands: Connection, results: Connection) -> None:
        self.engine = engine
        self.commands = commands
        self.results = results
        self.applied = 0  # seq of the last command applied
        self.paused = False  # after a failed step, until the server's abort arrives
        self.compiling: dict[str, tuple[AddRequest, Future]] = {}
        self.refused: list[tuple[str, str]] = []  # (request id, error) of adds refused here
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="nanovllm-grammar")
        self._send_lock = threading.Lock()  # the loop and a worker-death callback both send

    def on_worker_death(self, error: BaseException) -> None:
        """A worker process died (the executor's watchdog thread): nothing can run any more."""
        logger.error("the engine process is ending: %s", error)
        self.fail(error)

    def fail(self, error: BaseException) -> None:
        """Tell the server's process why this process ends, then exit non-zero (never returns)."""
        with self._send_lock:  # not in the middle of a StepBatch
            _report(self.results, error)
            _exit(EXIT_FAILED)

    def run(self) -> None:
        engine = self.engine
        while True:
            steppable = engine.has_unfinished_requests() and not self.paused
            timeout = 0.0 if steppable else (COMPILE_POLL_S if self.compiling else None)
            changed = False
            if self.commands.poll(timeout):  # timeout None: block until a command comes
                while True:
                    command = self.commands.recv()
                    if isinstance(command, Shutdown):
                        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
                        return
                    self._apply(command)
                    if not self.commands.poll(0):
                        break
                changed = True
            changed |= self._admit_compiled()
            if engine.has_unfinished_requests() and not self.paused:
                self._step()
            elif changed or self.refused:  # e.g. aborts freed blocks: the server's /metrics must see it
                self._send(stepped=False, t_start=time.monotonic(), outputs=[])

    def _apply(self, command) -> None:
        self.applied = command.seq
        if isinstance(command, AbortRequests):
            self.paused = False  # the server's verdict after a failed step (or an ordinary abort)
            ids = [rid for rid in command.request_ids if self.compiling.pop(rid, None) is None]
            self.engine.abort_request(ids)  # raises only when the engine's state is broken: the process ends
            return
        if not isinstance(command, AddRequest):
            raise TypeError(f"unknown engine command {type(command).__name__}")
        if command.params.structured_outputs is not None:
            future = self._grammar_pool.submit(self.engine.compile_structured_outputs, command.params)
            self.compiling[command.request_id] = (command, future)
            return
        self._add(command)

    def _add(self, command: AddRequest) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    arrival_time=command.arrival_time)
        except Exception as e:  # the server's process checked it already: a disagreement, reported as a failure
            logger.error("request %s refused in the engine process: %r", command.request_id, e)
            self.refused.append((command.request_id, repr(e)))

    def _admit_compiled(self) -> bool:
        done = [rid for rid, (_, future) in self.compiling.items() if future.done()]
        for rid in done:
            command, future = self.compiling.pop(rid)
            if future.exception() is not None:
                self.refused.append((rid, repr(future.exception())))
            else:
                self._add(command)  # the grammar is cached now
        return bool(done)

    def _step(self) -> None:
        t_start = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:
            if self.engine.failure is not None:  # a worker process is gone: nothing can run
                raise
            logger.exception("engine step failed; the server fails the requests it was running")
            self.paused = True
            self._send(stepped=True, t_start=t_start, outputs=[],
                       failure=StepFailure(repr(e), sorted(self.engine.running_request_ids())))
            return
        self._send(stepped=True, t_start=t_start, outputs=encode_outputs(outputs))

    def _send(self, stepped: bool, t_start: float, outputs: list, failure: Optional[StepFailure] = None) -> None:
        if self.refused:  # the server fails them as it fails a step's requests
            ids, errors = [rid for rid, _ in self.refused], "; ".join(error for _, error in self.refused)
            failure = (StepFailure(errors, ids) if failure is None
                       else StepFailure(failure.error, failure.request_ids + ids))
            self.paused = True
            self.refused = []
        batch = StepBatch(self.applied, stepped, t_start, time.monotonic(), self.engine.stats(), outputs, failure)
        with self._send_lock:
            self.results.send(batch)


def _run_on_thread(fn) -> None:
    """fn() on a thread of its own, as the engine steps in the server's process (AsyncLLMEngine's
    engine thread), re-raising what it raised. On a CPU shared with other processes, steps on the
    main thread were measured 5x slower (2 cores, load 4: OpenMP's team of the main thread
    spin-waits for descheduled threads); a thread's own team does not."""
    error: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=target, name="nanovllm-engine")
    thread.start()
    thread.join()
    if error:
        raise error[0]


def _report(results: Connection, error: BaseException) -> None:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines[-TRACEBACK_LINES:])
    try:
        results.send(EngineFailed(error, tail))
    except Exception:  # the exception does not pickle (or the pipe is gone): its text then
        try:
            results.send(EngineFailed(RuntimeError(f"{type(error).__name__}: {error}"), tail))
        except Exception:
            pass


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent(conn: Connection) -> None:
    try:
        conn.recv()  # nothing is ever sent: returns (EOFError) when the server's process is gone
    except (EOFError, OSError):
        pass
    os._exit(EXIT_FAILED)
