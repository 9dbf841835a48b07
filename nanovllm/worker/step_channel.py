"""Rank 0 -> every other rank: each step's plain-data input, over the control (gloo) group.

Why a gloo broadcast. It is torch.distributed's own transport, so the same code serves
ranks on one host and on several (torchrun), and there is nothing of ours to keep alive
(no sockets, no polling threads). Its cost is a network round per collective, so a step
costs one: the pickled step travels inline in a fixed buffer (`INLINE_BYTES`, enough for a
decode step of a few hundred requests) with its length in front; only a larger step (a batch
of new long prompts) needs a second broadcast for the rest. `broadcast_object_list` would
take two collectives every step (sizes, then bytes) plus its own tensor conversions.

Rank 0 publishes while the device still runs the previous step (async scheduling), so the
round overlaps GPU work. A world of one rank sends nothing. `None` tells the workers to stop.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

INLINE_BYTES = 32 * 1024
HEADER_BYTES = 8  # the pickle's length, int64


class StepChannel:
    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self._buf = torch.zeros(INLINE_BYTES, dtype=torch.uint8)
        self._np = self._buf.numpy()
        self._opts = dist.BroadcastOptions()
        self._opts.rootRank = 0

    def _broadcast(self, t: torch.Tensor) -> None:
        self.group.broadcast([t], self._opts).wait()

    def publish(self, obj: Any) -> None:
        """Rank 0: send `obj` (a StepInput, or None to stop) to every other rank."""
        if self.world_size == 1:
            return
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        inline = min(n, INLINE_BYTES - HEADER_BYTES)
        self._np[:HEADER_BYTES].view(np.int64)[0] = n
        self._np[HEADER_BYTES:HEADER_BYTES + inline] = np.frombuffer(data, dtype=np.uint8, count=inline)
        self._broadcast(self._buf)
        if n > inline:
            self._broadcast(torch.frombuffer(bytearray(data[inline:]), dtype=torch.uint8))

    def receive(self) -> Any:
        """Ranks > 0: wait for rank 0's next object."""
        self._broadcast(self._buf)
        n = int(self._np[:HEADER_BYTES].view(np.int64)[0])
        inline = min(n, INLINE_BYTES - HEADER_BYTES)
        if n == inline:
            return pickle.loads(self._np[HEADER_BYTES:HEADER_BYTES + n])
        rest = torch.empty(n - inline, dtype=torch.uint8)
        self._broadcast(rest)
        return pickle.loads(self._np[HEADER_BYTES:HEADER_BYTES + inline].tobytes() + rest.numpy().tobytes())
