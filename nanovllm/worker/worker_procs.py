"""The worker processes of a tensor-parallel engine: spawn, watch, stop.

`WorkerProcesses` spawns ranks 1..N-1 with torch.multiprocessing ("spawn": CUDA cannot be
forked) and a watchdog thread that waits on their sentinels. The first worker that ends
while the engine runs is reported once, to `on_death(message)`, with its rank, pid, exit code
or signal, and the exception it sent before exiting (worker_process.spawned_main). Each
worker also holds the read end of a pipe whose write end lives here: when this process
dies, however abruptly, the worker sees EOF and exits.

A spawned worker runs nanovllm code only (its target and arguments are importable), so the
user's script is not re-run in it: without that, a script that starts an engine at top level
(no `if __name__ == "__main__":`) would start another engine inside every worker.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import signal
import threading
import time
from typing import Callable, Optional

import torch

from nanovllm.worker.spawn import main_module_not_rerun as _main_module_not_rerun
from nanovllm.worker.worker_process import RankSpec, spawned_main

logger = logging.getLogger("nanovllm")

JOIN_S = 10.0  # workers get this long to stop after the stop message, then are terminated
TERMINATE_JOIN_S = 5.0  # then killed
REPORT_WAIT_S = 0.5  # a dead worker's exception report: how long to wait for it on its pipe


class WorkerProcesses:
    def __init__(self, specs: list[RankSpec], num_threads: Optional[int], on_death: Callable[[str], None]) -> None:
        """Start one process per spec; `num_threads`: torch threads per CPU worker (None: default)."""
        self._on_death = on_death
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._reports: dict[int, multiprocessing.connection.Connection] = {}
        self._alive_pipes: list = []
        self._stopping = False
        ctx = torch.multiprocessing.get_context("spawn")
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        with _main_module_not_rerun():
            for spec in specs:
                report_r, report_w = ctx.Pipe(duplex=False)
                alive_r, alive_w = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=spawned_main, name=f"nanovllm-tp-rank{spec.rank}", daemon=True,
                                   args=(spec, report_w, alive_r, num_threads))
                proc.start()
                report_w.close()
                alive_r.close()
                self._procs[spec.rank], self._reports[spec.rank] = proc, report_r
                self._alive_pipes.append(alive_w)
        self._watchdog = threading.Thread(target=self._watch, name="nanovllm-tp-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self._procs.items()}

    def _watch(self) -> None:
        sentinels = {proc.sentinel: rank for rank, proc in self._procs.items()}
        ready = multiprocessing.connection.wait(list(sentinels) + [self._wake_r])
        if self._stopping or self._wake_r in ready:
            return
        rank = sentinels[ready[0]]
        proc, report = self._procs[rank], None
        try:
            if self._reports[rank].poll(REPORT_WAIT_S):
                report = self._reports[rank].recv()
        except (EOFError, OSError):
            pass
        proc.join(REPORT_WAIT_S)
        if self._stopping:
            return
        if report and "\n" in report.strip():  # the worker's traceback tail, for the log only
            logger.error("tensor-parallel worker rank %d failed:\n%s", rank, report.strip())
        self._on_death(describe_death(rank, proc.pid, proc.exitcode, report))

    def stop(self, graceful: bool) -> None:
        """Join the workers (`graceful`: they were told to stop), else terminate, then kill them."""
        self._stopping = True
        if not self._wake_w.closed:
            self._wake_w.close()  # the watchdog returns
        procs = [p for p in self._procs.values() if p.is_alive()]
        if graceful:
            end = time.monotonic() + JOIN_S
            for p in procs:
                p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        end = time.monotonic() + TERMINATE_JOIN_S
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()

    def close(self) -> None:
        """Stop (ungracefully if still running) and release the pipes."""
        self.stop(graceful=False)
        for conn in [*self._reports.values(), *self._alive_pipes, self._wake_r]:
            conn.close()
        self._reports, self._alive_pipes = {}, []


def describe_death(rank: int, pid: Optional[int], exitcode: Optional[int], report: Optional[str]) -> str:
    """'tensor-parallel worker rank 1 (pid 123) was killed by signal SIGKILL' (+ its exception's
    first line: `report` is what the worker sent, its traceback tail after the first line)."""
    if exitcode is None:
        how = "stopped responding"
    elif exitcode < 0:
        try:
            how = f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    text = f"tensor-parallel worker rank {rank} (pid {pid}) {how}"
    summary = report.strip().splitlines()[0] if report and report.strip() else ""
    if summary:
        return f"{text}: {summary}"
    if exitcode is not None and exitcode > 0:  # it failed before it could report (e.g. while starting)
        return f"{text} before reporting an error (its own output above says why)"
    return text
