"""StepTimer: wall time per phase of engine steps, where a step's host time goes (benchmarks).

On with `EngineConfig.step_timing` (or NANOVLLM_STEP_TIMING=1). The engine calls
`mark(phase)` at the end of each phase; an in-process worker marks its own phases (the
executor hands it the timer). Each phase is the time since the previous mark, so a phase
that a step skips costs nothing and a mark closes whatever ran since the last one.

    schedule        Scheduler.schedule and the engine's bookkeeping of it
    build_step      StepBuilder: the plain-data StepInput
    prepare_inputs  worker: request states, block copies, the step's input arrays and their copy
    forward         worker: the model's forward (on CUDA: launching it or replaying its graph)
    sampling_prep   worker: SamplingBatch, the per-request sampling parameters as tensors
    sample          worker: the sampler (on CUDA: launching it)
    launch_rest     the rest of the launch (tokens' copy to the host, bookkeeping) and
                    Scheduler.advance (async scheduling)
    resolve         waiting for the step's results and reading them (on CUDA: the GPU wait)
    update          Scheduler.update: tokens appended, EOS / length stops, prefix-cache blocks
    detokenize      per-request token bookkeeping, logprobs, IncrementalDetokenizer, stop strings
    outputs         RequestOutput objects

On a CPU every phase but forward and sample is host work (benchmarks/host_step_cost.py
reports them per batch size); on CUDA forward and sample are launches and resolve holds the
wait for the GPU.
"""

from __future__ import annotations

import time

HOST_PHASES = ("schedule", "build_step", "prepare_inputs", "sampling_prep", "launch_rest", "resolve", "update",
               "detokenize", "outputs")


class StepTimer:
    PHASES = ("schedule", "build_step", "prepare_inputs", "forward", "sampling_prep", "sample", "launch_rest",
              "resolve", "update", "detokenize", "outputs")
    LAST_PHASE = PHASES[-1]  # marking it counts a step

    def __init__(self, clock=time.perf_counter) -> None:
        """`clock`: wall time by default; benchmarks on a shared machine pass `time.thread_time`
        (this thread's CPU time: what the host work costs, without the time other processes took)."""
        self.clock = clock
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        self._last = 0.0

    def reset(self) -> None:
        """Forget what was measured (e.g. warm-up and prefill steps before a timed window)."""
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0

    def start(self) -> None:
        self._last = self.clock()

    def mark(self, phase: str) -> None:
        now = self.clock()
        self.totals[phase] += now - self._last
        self._last = now
        if phase == self.LAST_PHASE:
            self.steps += 1

    def per_step(self) -> dict[str, float]:
        """Seconds per step of each phase."""
        n = max(1, self.steps)
        return {k: v / n for k, v in self.totals.items()}

    def summary(self) -> str:
        return (", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in self.per_step().items())
                + f" (per step, {self.steps} steps)")
