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

import math

import numpy as np
import torch

from nanovllm.kernels.launch_math import cdiv

SEGMENT_ALIGN = 256  # bytes; >= Triton's 16-byte pointer alignment, and the caching allocator's granularity
GROWTH = 2  # a buffer that is too small grows to this many times what the step needs
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


class StagingBuffer:
    """A pinned (on CUDA) uint8 host buffer, re-carved into typed arrays every step.

    This runs on every step's host path, so it sticks to cheap operations: Python integer
    math for the layout, numpy views on the host, and on the device one dtype view of the
    copy per dtype plus one slice per array (each torch call costs microseconds).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._host = torch.empty(0, dtype=torch.uint8)
        self._host_np = self._host.numpy()
        self._segments: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # offset, bytes, dtype, shape
        self._used = 0

    def layout(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, np.ndarray]:
        """Segments for `specs` ({name: (shape, dtype)}, dtypes in _NUMPY_DTYPES), as numpy
        views of the host buffer.

        The views stay valid until the next `layout` call of this buffer; their contents are
        whatever the buffer held before (callers write every element they use)."""
        offset, segments = 0, {}
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            segments[name] = (offset, nbytes, dtype, shape)
            offset += cdiv(nbytes, SEGMENT_ALIGN) * SEGMENT_ALIGN
        if offset > len(self._host_np):
            self._host = torch.empty(GROWTH * offset, dtype=torch.uint8, pin_memory=self.pin)
            self._host_np = self._host.numpy()
        self._segments, self._used = segments, offset
        buf = self._host_np
        return {name: buf[o : o + n].view(_NUMPY_DTYPES[dtype]).reshape(shape)
                for name, (o, n, dtype, shape) in segments.items()}

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        """All segments on `device` after one copy (non-blocking from pinned memory on CUDA; a
        clone on CPU, since the host buffer is refilled by a later step)."""
        used = self._host[: self._used]
        dev = used.clone() if device.type == "cpu" else used.to(device, non_blocking=True)
        typed = {}  # dtype -> the whole copy viewed as that dtype (the used size is SEGMENT_ALIGN-aligned)
        out = {}
        for name, (o, n, dtype, shape) in self._segments.items():
            if dtype not in typed:
                typed[dtype] = dev.view(dtype)
            size = dtype.itemsize
            t = typed[dtype][o // size : (o + n) // size]
            out[name] = t if len(shape) == 1 else t.view(shape)
        return out
