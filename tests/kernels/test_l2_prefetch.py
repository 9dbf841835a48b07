"""The skinny GEMM's L2 prefetch plan (kernels/l2_prefetch.py): which bytes the first wave
asks the L2 for, and when there is no prefetch. (Its placement in the compiled kernel is
checked in tests/benchmarks/test_kernel_resources.py; results on the GPU in test_gemv.py.)"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import l2_prefetch
from nanovllm.kernels.l2_prefetch import (BULK_ALIGN_BYTES, L2_PREFETCH_LANES, MIN_PIECE_BYTES, NO_PREFETCH,
                                          plan_l2_prefetch, prefetch_plan, prefetched_bytes)

MB = 2**20
H200 = dict(sms=132, l2_bytes=50 * MB)


@pytest.mark.parametrize("nbytes, max_programs", [(33.5 * MB, 512), (8 * MB, 512), (201 * MB, 3072), (4 * MB, 128),
                                                  (1244 * MB, 18992)])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_plan_covers_a_prefix_of_the_weight_within_the_l2_share(nbytes, max_programs, fraction):
    nbytes = int(nbytes)
    plan = prefetch_plan(nbytes, max_programs, fraction=fraction, **H200)
    wanted = min(nbytes, int(fraction * H200["l2_bytes"]))
    assert plan.programs == min(H200["sms"], max_programs)
    assert plan.piece_bytes % BULK_ALIGN_BYTES == 0 and plan.piece_bytes >= MIN_PIECE_BYTES
    covered = prefetched_bytes(plan)
    # never past the weight or the L2 share; short of it by less than one 16-byte piece per lane
    assert wanted - plan.programs * L2_PREFETCH_LANES * BULK_ALIGN_BYTES < covered <= wanted


def test_no_plan_for_small_weights_or_no_programs():
    lanes = H200["sms"] * L2_PREFETCH_LANES
    assert prefetch_plan(lanes * MIN_PIECE_BYTES - 1, 1000, **H200) == NO_PREFETCH
    assert prefetch_plan(lanes * MIN_PIECE_BYTES, 1000, **H200).piece_bytes == MIN_PIECE_BYTES
    assert prefetch_plan(64 * MB, 0, **H200) == NO_PREFETCH


def test_no_plan_off_the_gpu():
    assert plan_l2_prefetch(torch.zeros(4096, 4096, dtype=torch.bfloat16), 512) == NO_PREFETCH


@pytest.mark.parametrize("text, value", [("", l2_prefetch.L2_PREFETCH_FRACTION), ("0.75", 0.75), (" 1 ", 1.0)])
def test_fraction_knob(text, value):
    assert l2_prefetch._fraction(text) == value


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "half"])
def test_fraction_knob_rejects_values_outside_the_l2(text):
    with pytest.raises(ValueError, match="NANOVLLM_L2_PREFETCH_FRACTION"):
        l2_prefetch._fraction(text)
