"""Executor: how the engine reaches its worker(s). The engine only ever talks to this interface.

    executor = Executor.create(config, model_info)   # workers built, KV cache allocated
    executor.num_kv_blocks                           # what the scheduler's block pool may use
    handle = executor.launch(step)                   # StepInput -> enqueued on the device(s)
    output = executor.resolve(handle)                # wait -> StepOutput
    executor.execute(step)                           # launch + resolve (the synchronous loop)
    executor.shutdown()

Steps and outputs are plain data (step_io.py), so an executor may run its workers in other
processes (tensor parallelism: one worker per GPU; rank 0's process schedules and sends
each step's input to every rank, and resolve returns rank 0's output) without the engine or
the scheduler changing. `InProcessExecutor` runs one worker in this process;
`MultiprocExecutor` one per tensor-parallel rank (below).
"""

from __future__ import annotations

import abc
import atexit
import functools
import logging
import os
import signal
import sys
import threading
import time
import weakref
from typing import Any, Callable, Optional

from nanovllm.config import EngineConfig
from nanovllm.loading.model_info import ModelInfo
from nanovllm.step_io import StepInput, StepOutput, WorkerInfo

logger = logging.getLogger("nanovllm")

FAILURE_NAME_WAIT_S = 3.0  # a collective failed: how long to wait for the watchdog to say which rank died
FAIL_GRACE_S = 5.0  # a worker died and the engine's call is still stuck after this: the process exits
EXIT_WORKER_DIED = 1
READY_POLL_S = 0.05


class WorkerDiedError(RuntimeError):
    """A worker process of a tensor-parallel engine ended: the engine cannot run steps any more."""


class Executor(abc.ABC):
    info: WorkerInfo  # set by the constructor, once every worker is ready

    @staticmethod
    def create(config: EngineConfig, model_info: ModelInfo, step_timer=None) -> "Executor":
        """The executor for this configuration: in-process ("uni"), or one process per
        tensor-parallel rank ("mp"; checked against the model and the devices before any
        process starts). Under torchrun, ranks > 0 run their worker here until rank 0's engine
        stops, then exit (SystemExit(0)): only rank 0 gets an executor back."""
        if config.executor_backend == "uni":
            return InProcessExecutor(config, model_info, step_timer=step_timer)
        from nanovllm import envs
        from nanovllm.worker.parallel import Rendezvous, validate_parallel_config

        torchrun = envs.torchrun_env()
        validate_parallel_config(config, model_info.hf_config, torchrun)
        if torchrun is not None and torchrun.rank != 0:
            from nanovllm.worker.worker_process import RankSpec, run_rank

            rendezvous = Rendezvous(torchrun.master_addr, torchrun.master_port, torchrun.world_size, torchrun=True)
            run_rank(RankSpec(torchrun.rank, torchrun.local_rank, config, model_info, rendezvous))
            raise SystemExit(0)
        return MultiprocExecutor(config, model_info, step_timer=step_timer, torchrun=torchrun)

    @property
    def num_kv_blocks(self) -> int:
        return self.info.num_kv_blocks

    @abc.abstractmethod
    def launch(self, step: StepInput) -> Any:
        """Enqueue one step on the worker(s) without waiting for the device; returns a handle."""

    @abc.abstractmethod
    def resolve(self, handle: Any) -> StepOutput:
        """Wait for a launched step and return its output (handles are resolved in launch order)."""

    def execute(self, step: StepInput) -> StepOutput:
        return self.resolve(self.launch(step))

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the workers (idempotent)."""

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(error)` runs on a watchdog thread when a worker process dies (the in-process
        executor has none that could)."""

    @property
    def failure(self) -> Optional[str]:
        """Why the executor can run no more steps (a worker died), else None."""
        return None


class InProcessExecutor(Executor):
    """One worker in the engine's process; `worker` is reachable for tests and benchmarks."""

    def __init__(self, config: EngineConfig, model_info: ModelInfo, step_timer=None) -> None:
        from nanovllm.worker.worker import Worker  # torch and the model code: only when an engine starts

        self.worker = Worker(config, model_info, step_timer=step_timer)
        self.info = self.worker.initialize_cache(self.worker.determine_num_kv_blocks())

    def launch(self, step: StepInput):
        return self.worker.launch(step)

    def resolve(self, handle) -> StepOutput:
        return self.worker.resolve(handle)

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


class MultiprocExecutor(Executor):
    """One worker per tensor-parallel rank; rank 0's runs in the engine's process.

        engine process (rank 0)                          worker processes (ranks 1..N-1)
        Scheduler -> StepInput
        launch: StepChannel.publish(step) ──gloo──►      StepChannel.receive()
                Worker.launch(step)   ◄──NCCL/gloo──►    Worker.launch(step)   (all-reduces, logits
        resolve: Worker.resolve -> StepOutput            Worker.resolve         gather, tokens)

    Every rank runs the same worker on the same steps; rank 0 samples and alone returns
    outputs. Ranks 1..N-1 are spawned children (worker_procs.py), or torchrun's processes,
    possibly on other hosts (worker_process.py). At tensor_parallel_size 1 (backend "mp") the
    one rank is this process's worker, built over a one-rank group, and nothing is sent.

    Failures. A watchdog waits on the children's sentinels. When one dies unexpectedly it
    names the rank, its exit code or signal and the exception the worker reported, stops the
    other workers, runs the failure callbacks (the server shuts down) and makes the call in
    flight raise `WorkerDiedError` (on gloo a collective with a dead peer fails at once; an
    NCCL one is aborted); if that call is still stuck after FAIL_GRACE_S the process exits
    with EXIT_WORKER_DIED rather than hang. Every later call raises the same error.

    Ctrl-C: the children ignore it; one that arrives while rank 0 publishes and launches a
    step is held until the launch is done, so rank 0 never abandons a step the others run.
    """

    def __init__(self, config: EngineConfig, model_info: ModelInfo, step_timer=None, torchrun=None) -> None:
        self.world_size = config.tensor_parallel_size
        self.worker = self.groups = self.channel = self.procs = None
        self._store = None
        self._failure: Optional[str] = None
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        self._lock = threading.Lock()
        self._calls = 0  # engine calls in flight (the watchdog's question: is one stuck?)
        self._closed = False
        self._atexit_hook = functools.partial(_shutdown_if_alive, weakref.ref(self))
        atexit.register(self._atexit_hook)
        try:
            self._start(config, model_info, step_timer, torchrun)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig, model_info: ModelInfo, step_timer, torchrun) -> None:
        from nanovllm.worker.parallel import Rendezvous, connect_store, host_store, rank_device
        from nanovllm.worker.worker_process import RankSpec, start_groups_and_worker

        world = self.world_size
        local_rank = torchrun.local_rank if torchrun is not None else 0
        device = rank_device(config, local_rank)
        if torchrun is not None:
            rendezvous = Rendezvous(torchrun.master_addr, torchrun.master_port, world, torchrun=True)
            self._store = connect_store(rendezvous, 0)
        else:
            self._store, rendezvous = host_store(world)
            if world > 1:
                from nanovllm.worker.worker_procs import WorkerProcesses

                threads = max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else None
                specs = [RankSpec(rank, rank, config, model_info, rendezvous) for rank in range(1, world)]
                self.procs = WorkerProcesses(specs, threads, self._on_worker_death)
        self._calls += 1
        try:
            self._wait_ready()
            spec = RankSpec(0, local_rank, config, model_info, rendezvous)
            self.groups, self.channel, self.worker = start_groups_and_worker(spec, self._store, device, world,
                                                                             step_timer)
        except Exception as e:
            raise self._explain(e)
        finally:
            self._calls -= 1
        self.info = self.worker.info()
        how = "torchrun" if torchrun is not None else ("spawned workers" if world > 1 else "this process only")
        logger.info("nanovllm: tensor parallelism over %d rank(s) (%s) on %s", world, how, self.info.device)

    def _wait_ready(self) -> None:
        """Wait for every rank to reach the rendezvous, watching for a worker that dies first."""
        from nanovllm.worker.parallel import STARTUP_TIMEOUT
        from nanovllm.worker.worker_process import ready_key

        keys = [ready_key(rank) for rank in range(1, self.world_size)]
        deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
        while keys and not self._store.check(keys):
            self._raise_if_failed()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not all start within {STARTUP_TIMEOUT}")
            time.sleep(READY_POLL_S)

    # ------------------------------------------------------------------ steps
    def launch(self, step: StepInput):
        self._raise_if_failed()
        self._calls += 1
        try:
            if self.world_size == 1:  # nobody to tell
                return self.worker.launch(step)
            with _SigintDeferred():
                self.channel.publish(step)
                return self.worker.launch(step)
        except Exception as e:
            raise self._explain(e)
        finally:
            self._calls -= 1

    def resolve(self, handle) -> StepOutput:
        self._raise_if_failed()
        self._calls += 1
        try:
            return self.worker.resolve(handle)
        except Exception as e:
            raise self._explain(e)
        finally:
            self._calls -= 1

    def add_failure_callback(self, callback: Callable[[BaseException], None]) -> None:
        self._failure_callbacks.append(callback)

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    # ------------------------------------------------------------------ failures
    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)

    def _explain(self, error: Exception) -> Exception:
        """A collective that failed because a worker died becomes WorkerDiedError naming it."""
        if isinstance(error, WorkerDiedError) or not isinstance(error, RuntimeError) or self.procs is None:
            return error
        deadline = time.monotonic() + FAILURE_NAME_WAIT_S
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._failure is None:
            return error
        died = WorkerDiedError(self._failure)
        died.__cause__ = error
        return died

    def _on_worker_death(self, message: str) -> None:
        """The watchdog thread's report of a worker that ended while the engine runs."""
        with self._lock:
            if self._closed or self._failure is not None:
                return
            self._failure = message
        logger.error("nanovllm: %s; the engine cannot continue", message)
        self.procs.stop(graceful=False)
        error = WorkerDiedError(message)
        for callback in list(self._failure_callbacks):
            try:
                callback(error)
            except Exception:  # one broken callback must not keep the others from running
                logger.exception("failure callback raised")
        groups = self.groups
        if groups is not None and groups.device_group_is_nccl:
            groups.abort()  # an NCCL collective waiting on the dead rank never fails by itself
        deadline = time.monotonic() + FAIL_GRACE_S
        while self._calls and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._calls:
            sys.stderr.write(f"nanovllm: {message}; the engine is stuck waiting for it: exiting\n")
            sys.stderr.flush()
            os._exit(EXIT_WORKER_DIED)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit_hook)
        graceful = self._failure is None and self.channel is not None and self.world_size > 1
        if graceful:  # tell the workers to stop; stop them by force if that cannot get through
            timer = threading.Timer(FAIL_GRACE_S, self.procs.stop, kwargs={"graceful": False}) if self.procs else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            try:
                self.channel.publish(None)
            except Exception as e:
                logger.debug("stop message not delivered: %r", e)
            finally:
                if timer is not None:
                    timer.cancel()
        if self.procs is not None:
            self.procs.stop(graceful=graceful)
            self.procs.close()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        self.channel = None  # it holds the control group: released here, not at interpreter teardown
        if self.groups is not None:
            self.groups.shutdown()
            self.groups = None
        self._store = None


class _SigintDeferred:
    """Hold a Ctrl-C (SIGINT) until the block ends, then deliver it (main thread only)."""

    __slots__ = ("_active", "_previous", "_received")

    def __enter__(self) -> "_SigintDeferred":
        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            self._received = False
            self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self._received = True

    def __exit__(self, *exc) -> None:
        if not self._active:
            return
        previous = self._previous if self._previous is not None else signal.SIG_DFL
        signal.signal(signal.SIGINT, previous)
        if self._received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _shutdown_if_alive(ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
