"""One pinned host buffer per step for all of the step's input arrays: one host-to-device copy.

Why. A decode step's inputs are a handful of small arrays (token ids, positions, slots,
sequence lengths, block tables, sampled-row indices...). Copied one by one, each is its own
transfer on the GPU's stream, ~1 us of copy plus ~2 us of gap, in front of every step: at
batch 1 that was ~25 us of a ~0.86 ms step. Packed into one pinned buffer they travel in a
single copy, and each array is a typed view into the device copy.

Each array gets an aligned segment (SEGMENT_ALIGN bytes, so that Triton's 16-byte pointer
specialisation holds on every view). `StagingBuffer.layout` carves the segments for a step
(growing the buffer when needed) and returns numpy views to fill; `to_device` copies the
used bytes once and returns device views of the same names and shapes.
"""

from __future__ import annotations

import numpy as np
import torch

SEGMENT_ALIGN = 256  # bytes; >= Triton's 16-byte pointer alignment, and the caching allocator's granularity
GROWTH = 2  # a buffer that is too small grows to this many times what the step needs


def _aligned(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


class StagingBuffer:
    """A pinned (on CUDA) uint8 host buffer, re-carved into typed arrays every step."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._host = torch.empty(0, dtype=torch.uint8)
        self._segments: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self._used = 0

    def layout(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, np.ndarray]:
        """Segments for `specs` ({name: (shape, dtype)}), as numpy views of the host buffer.

        The views stay valid until the next `layout` call of this buffer; their contents are
        whatever the buffer held before (callers write every element they use)."""
        offset, segments = 0, {}
        for name, (shape, dtype) in specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            segments[name] = (offset, dtype, tuple(shape))
            offset += _aligned(nbytes)
        if offset > self._host.numel():
            self._host = torch.empty(GROWTH * offset, dtype=torch.uint8, pin_memory=self.pin)
        self._segments, self._used = segments, offset
        return {name: self._view(self._host, name).numpy() for name in segments}

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """All segments on `device` after one copy (non-blocking from pinned memory on CUDA; a
        clone on CPU, since the host buffer is refilled by a later step)."""
        used = self._host[: self._used]
        dev = used.clone() if device.type == "cpu" else used.to(device, non_blocking=True)
        return {name: self._view(dev, name) for name in self._segments}

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        offset, dtype, shape = self._segments[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return buf[offset : offset + nbytes].view(dtype).view(shape)
