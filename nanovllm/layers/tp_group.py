"""The tensor-parallel group a model's layers communicate over, and how layers find it.

`TPGroup` is one rank's view: its rank, the world size and the device process group
(NCCL on GPUs, gloo on CPU) that the worker created for this engine (worker/parallel.py).
Layers only call its three collectives; each is the identity at world size 1, so a model
built without tensor parallelism runs exactly the single-GPU code.

Layers find the group the way they find their device and dtype: the worker builds the model
inside `building_with(group)` and every parallel layer's constructor reads `build_group()`
(a context variable, set only for the duration of the build and per thread). Model files
therefore just instantiate ColumnParallel / RowParallel / vocab-parallel layers with the
model's full sizes; each layer keeps the group it was built with on itself, so two engines
in one process never share one.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import torch


class TPGroup:
    """One rank of a tensor-parallel group (rank 0 samples; see worker/model_runner.py)."""

    def __init__(self, rank: int = 0, world_size: int = 1, device_group: Any = None) -> None:
        if world_size > 1 and device_group is None:
            raise ValueError("a tensor-parallel group of several ranks needs a process group")
        self.rank, self.world_size, self.device_group = rank, world_size, device_group
        if world_size > 1:  # the collectives' option structs, made once
            from torch.distributed import AllreduceOptions, BroadcastOptions, GatherOptions, ReduceOp

            self._sum = AllreduceOptions()
            self._sum.reduceOp = ReduceOp.SUM
            self._to_first = GatherOptions()
            self._to_first.rootRank = 0
            self._from_first = BroadcastOptions()
            self._from_first.rootRank = 0

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, world_size={self.world_size})"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (capturable in a CUDA graph on NCCL)."""
        if self.world_size == 1:
            return x
        self.device_group.allreduce([x], self._sum).wait()
        return x

    def gather_to_first(self, x: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Every rank's `x` (same shape on all ranks), on rank 0 in rank order; None elsewhere."""
        if self.world_size == 1:
            return [x]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else []
        self.device_group.gather([parts] if self.rank == 0 else [], [x], self._to_first).wait()
        return parts if self.rank == 0 else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank, in place."""
        if self.world_size == 1:
            return x
        self.device_group.broadcast([x], self._from_first).wait()
        return x


SINGLE = TPGroup()  # no tensor parallelism (immutable in practice: layers only read it)

_BUILD_GROUP: contextvars.ContextVar[TPGroup] = contextvars.ContextVar("nanovllm_tp_build_group", default=SINGLE)


@contextlib.contextmanager
def building_with(group: TPGroup) -> Iterator[TPGroup]:
    """Parallel layers constructed inside this block shard themselves over `group`."""
    token = _BUILD_GROUP.set(group)
    try:
        yield group
    finally:
        _BUILD_GROUP.reset(token)


def build_group() -> TPGroup:
    """The group of the model being built (SINGLE outside `building_with`)."""
    return _BUILD_GROUP.get()
