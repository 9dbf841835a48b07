"""StepTimer: wall time per phase of engine steps, where a step's host time goes (benchmarks).

On with `EngineConfig.step_timing` (or NANOVLLM_STEP_TIMING=1). The engine calls
`mark(phase)` at the end of each phase; an in-process worker marks "prepare_inputs" (the
executor hands it the timer). The forward phase ends with the sampled tokens' copy to the
host, so it includes waiting for the GPU.
"""

from __future__ import annotations

import time


class StepTimer:
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
