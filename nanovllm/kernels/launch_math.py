"""Plain-int helpers for sizing kernel launches on the host.

Every Triton wrapper pads block sizes to powers of two and counts tiles; these run once
per launch, so they stay plain Python ints (`triton.next_power_of_2` costs ~5 us a call).
"""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


# Cascade attention (kernels/cascade_attention.py): query rows per shared-prefix program. The
# host-side planner (layers/attention/cascade.py) packs queries into tiles of this many rows
# (queries x the query heads of one KV head), so the constant lives here, free of Triton.
CASCADE_BLOCK_M = 64
CASCADE_TILE_COLUMNS = 3  # a tile: (queries, shared keys, block-table row of the shared blocks)


def cascade_queries_per_tile(group: int) -> int:
    """Query tokens per cascade tile: CASCADE_BLOCK_M rows / the KV group's heads (padded to a power of two)."""
    return max(1, CASCADE_BLOCK_M // next_pow2(group))
