"""launch_math: the host-side sizing helpers every Triton wrapper uses (must match triton's own)."""

from __future__ import annotations

import triton

from nanovllm.kernels.launch_math import cdiv, next_pow2


def test_next_pow2_matches_triton_and_clamps_small_values():
    for n in list(range(1, 1100)) + [2**20 - 1, 2**20, 2**20 + 1, 151_936]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    assert next_pow2(0) == 1 and next_pow2(-5) == 1


def test_cdiv_is_the_ceiling_of_the_quotient():
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 257):
            assert cdiv(a, b) == triton.cdiv(a, b)
            assert (cdiv(a, b) - 1) * b < a <= cdiv(a, b) * b or a == 0
