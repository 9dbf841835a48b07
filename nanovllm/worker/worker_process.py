"""A tensor-parallel rank other than 0: its worker, fed rank 0's steps until told to stop.

Started by the engine (`MultiprocExecutor` spawns ranks 1..N-1 with torch.multiprocessing's
"spawn") or by torchrun (every rank > 0 of a `torchrun` launch, possibly on other hosts,
enters here from `Executor.create`). The rank mirrors rank 0's start-up (groups, model shard,
agreement on the KV block count, cache and graphs) and then runs every step rank 0
publishes, one step behind in resolving, as the engine is under async scheduling.

A spawned rank ignores Ctrl-C (the terminal sends it to the whole process group: the engine
process decides and stops its workers), exits at once when the engine process dies (its end
of a pipe closes), and reports an exception to the engine before exiting with code 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from nanovllm.config import EngineConfig
from nanovllm.loading.model_info import ModelInfo
from nanovllm.worker.parallel import ParallelGroups, Rendezvous, connect_store, rank_device
from nanovllm.worker.step_channel import StepChannel
from nanovllm.worker.worker import Worker

logger = logging.getLogger("nanovllm")

GROUP_NAME = "engine"  # store prefix of the engine's groups (one tensor-parallel engine per rendezvous)
EXIT_FAILED = 1
TRACEBACK_LINES = 6  # of the worker's traceback, sent to the engine with the exception


def ready_key(rank: int) -> str:
    """Set in the store by a rank once it is up (rank 0 waits for these, watching its workers)."""
    return f"nanovllm/{GROUP_NAME}/ready/{rank}"


@dataclass(frozen=True)
class RankSpec:
    """What one worker process needs (picklable)."""

    rank: int
    local_rank: int
    config: EngineConfig
    model_info: ModelInfo
    rendezvous: Rendezvous


def start_rank(spec: RankSpec) -> tuple[ParallelGroups, StepChannel, Worker]:
    """A rank > 0's start-up: its device, the rendezvous, then what every rank does."""
    world = spec.rendezvous.world_size
    device = rank_device(spec.config, spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = connect_store(spec.rendezvous, spec.rank)
    store.set(ready_key(spec.rank), "1")
    return start_groups_and_worker(spec, store, device, world)


def start_groups_and_worker(spec: RankSpec, store, device: torch.device, world: int,
                            step_timer=None) -> tuple[ParallelGroups, StepChannel, Worker]:
    """Groups, model shard, the agreed KV block count, cache and graphs: the same collectives
    in the same order on every rank."""
    groups = ParallelGroups(store, spec.rank, world, device, GROUP_NAME)
    channel = StepChannel(groups.control, spec.rank, world)
    worker = Worker(spec.config, spec.model_info, step_timer=step_timer, tp=groups.tp, device=device)
    groups.barrier()  # every rank loaded: a rank that failed to is seen here, on gloo, not in a device collective
    worker.initialize_cache(groups.min_over_ranks(worker.determine_num_kv_blocks()))
    return groups, channel, worker


def serve_steps(worker: Worker, channel: StepChannel) -> None:
    """Run rank 0's steps until it publishes None; resolve each step after launching the next."""
    in_flight = None
    while True:
        step = channel.receive()
        if step is None:
            break
        handle = worker.launch(step)
        if in_flight is not None:
            worker.resolve(in_flight)
        in_flight = handle
    if in_flight is not None:
        worker.resolve(in_flight)


def run_rank(spec: RankSpec) -> None:
    """A rank > 0 from start-up to rank 0's stop (torchrun's ranks call this directly)."""
    groups, channel, worker = start_rank(spec)
    try:
        serve_steps(worker, channel)
    finally:
        worker.shutdown()
        groups.shutdown()


def spawned_main(spec: RankSpec, report, parent_alive, num_threads: Optional[int]) -> None:
    """Entry point of a spawned worker process. `report`: a pipe end for the exception that
    ends it; `parent_alive`: a pipe end that reaches EOF when the engine process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_alive,), name="nanovllm-parent-watch",
                     daemon=True).start()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        run_rank(spec)
    except BaseException as e:  # tell the engine why, then exit non-zero
        lines = traceback.format_exception(type(e), e, e.__traceback__)
        try:
            report.send(f"{type(e).__name__}: {e}\n" + "".join(lines[-TRACEBACK_LINES:]))
        except OSError:
            pass
        _exit(EXIT_FAILED)
    _exit(0)  # skip the interpreter's teardown of torch (seconds): the engine is waiting to finish


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with_parent(conn) -> None:
    try:
        conn.recv()  # nothing is ever sent: returns (EOFError) when the engine process is gone
    except (EOFError, OSError):
        pass
    os._exit(EXIT_FAILED)
