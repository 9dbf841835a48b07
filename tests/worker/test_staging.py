"""StagingBuffer: a step's input arrays packed in one host buffer and copied in one transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.worker.staging import SEGMENT_ALIGN, StagingBuffer

SPECS = {
    "ids": ((5,), torch.int64),
    "lens": ((3,), torch.int32),
    "table": ((3, 4), torch.int32),
    "empty": ((0,), torch.int64),
}


def fill(host: dict) -> dict:
    rng = np.random.default_rng(0)
    for name, arr in host.items():
        arr[...] = rng.integers(-(2**31), 2**31 - 1, size=arr.shape)
    return {name: arr.copy() for name, arr in host.items()}


def test_views_round_trip_with_their_shapes_and_dtypes():
    buf = StagingBuffer(pin=False)
    host = buf.layout(SPECS)
    assert {k: (v.shape, v.dtype) for k, v in host.items()} == {
        "ids": ((5,), np.int64), "lens": ((3,), np.int32), "table": ((3, 4), np.int32), "empty": ((0,), np.int64)
    }
    want = fill(host)
    dev = buf.to_device(torch.device("cpu"))
    for name, (shape, dtype) in SPECS.items():
        assert dev[name].dtype == dtype and tuple(dev[name].shape) == shape
        np.testing.assert_array_equal(dev[name].numpy(), want[name])
    # every view starts on an aligned byte offset of one shared copy
    assert all(t.storage_offset() * t.element_size() % SEGMENT_ALIGN == 0 for t in dev.values())
    assert len({t.untyped_storage().data_ptr() for t in dev.values()}) == 1


def test_device_copy_is_independent_of_later_host_writes_and_growth():
    buf = StagingBuffer(pin=False)
    want = fill(buf.layout(SPECS))
    dev = buf.to_device(torch.device("cpu"))
    big = buf.layout({"ids": ((10_000,), torch.int64), "lens": ((7,), torch.int32)})  # grows the buffer
    big["ids"][:] = 7
    big["lens"][:] = np.arange(7)
    np.testing.assert_array_equal(dev["ids"].numpy(), want["ids"])  # the earlier step's copy is untouched
    dev2 = buf.to_device(torch.device("cpu"))
    assert torch.all(dev2["ids"] == 7) and dev2["lens"].tolist() == list(range(7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_pinned_copy_to_cuda():
    buf = StagingBuffer(pin=True)
    want = fill(buf.layout(SPECS))
    dev = buf.to_device(torch.device("cuda"))
    torch.cuda.synchronize()
    for name in SPECS:
        assert dev[name].is_cuda
        np.testing.assert_array_equal(dev[name].cpu().numpy(), want[name])
