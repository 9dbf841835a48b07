"""ForwardContext: everything attention needs to know about one batch, passed explicitly.

Built by the worker's ModelRunner from a step's inputs; handed to `model.forward(input_ids,
positions, ctx)` and from there to every attention layer. Never a global. It lives with the
layers (not the worker) because layers and models read it and may only import down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class CascadeInputs:
    """A step's cascade plan on the device (built from `layers/attention/cascade.CascadePlan`).

    Attention layers without a sliding window compute the shared prefixes once per tile and
    each sequence's suffix over `suffix_block_tables` (kernels/cascade_attention.py).
    """

    suffix_block_tables: torch.Tensor  # [num_seqs, width] int32: each table without its shared blocks
    suffix_seq_lens: torch.Tensor  # [num_seqs] int32: seq_lens minus the shared keys
    tiles: torch.Tensor  # [num_tiles, 3] int32: (queries, shared keys, block-table row)
    query_rows: torch.Tensor  # [num_tiles * queries_per_tile] int32, -1 = empty slot
    queries_per_tile: int
    max_suffix_len: int  # upper bound of suffix_seq_lens (the suffix kernel's split count)
    max_shared_len: int  # upper bound of the tiles' shared keys
    num_splits: Optional[int] = None  # shared-prefix kernel splits; None = chosen per call (eager steps)
    prefixes: Optional[list] = None  # host description, [SharedPrefix] (the CPU path)
    suffix_seq_lens_cpu: Optional[list[int]] = None  # host copy (the CPU path)


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [num_tokens] int64, absolute position of each new token
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot of each new token, -1 = padding
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32 (unused entries 0)
    max_query_len: int  # longest run of new tokens of one sequence
    max_seq_len: int  # longest context in the batch
    num_seqs: int
    # Host copies, for the torch reference path and for kernel launch decisions.
    query_start_loc_cpu: Optional[list[int]] = None
    seq_lens_cpu: Optional[list[int]] = None
    # Shared prefixes read once for several query rows (cascade attention); None = no plan.
    cascade: Optional[CascadeInputs] = None
    # Per-step values the CPU path derives once and every layer reuses (masks, gather
    # indices, RoPE cos/sin). Lives and dies with this step's context.
    scratch: dict = field(default_factory=dict)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
