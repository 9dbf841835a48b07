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
the scheduler changing. `InProcessExecutor` runs one worker in this process.
"""

from __future__ import annotations

import abc
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.loading.model_info import ModelInfo
from nanovllm.step_io import StepInput, StepOutput, WorkerInfo


class Executor(abc.ABC):
    info: WorkerInfo  # set by the constructor, once every worker is ready

    @staticmethod
    def create(config: EngineConfig, model_info: ModelInfo, step_timer=None) -> "Executor":
        """The executor for this configuration (one in-process worker until tensor parallelism lands)."""
        return InProcessExecutor(config, model_info, step_timer=step_timer)

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
