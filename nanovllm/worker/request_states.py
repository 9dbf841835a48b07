"""The worker's copy of each live request: what a step's inputs and sampling need.

Kept up to date from each `StepInput` (step_io.py): new requests arrive whole, known ones
get their appended blocks and the tokens generated since they were last sent, finished and
preempted ones are dropped. The token history feeds the next step's input ids (prefill
chunks, recomputation after preemption) and the sampler (penalties read every token so far).
The engine sends only token values it knows on the host: under async scheduling the newest
token of a decoding request may not be here yet, and the runner then reads it from the
previous step's sampled tensor on the device.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from nanovllm.sampling_params import SamplingParams
from nanovllm.step_io import NewRequest, PromptThenOutputTokens, StepInput

MIN_BLOCK_CAPACITY = 16  # block-table columns first allocated (the table widens as requests grow)
MIN_TABLE_ROWS = 16  # rows (live requests) first allocated


class BlockTables:
    """The block tables of every live request as rows of one int32 array, zero past each table's
    end. A step's `[num_seqs, max_blocks]` block-table input is then one gather of its requests'
    rows (`gather`) instead of a copy per request; a row is written only when blocks arrive."""

    def __init__(self, width: int = MIN_BLOCK_CAPACITY) -> None:
        self.array = np.zeros((MIN_TABLE_ROWS, max(MIN_BLOCK_CAPACITY, width)), dtype=np.int32)
        self._free_rows = list(range(MIN_TABLE_ROWS - 1, -1, -1))  # popped from the end: low rows first

    def take_row(self) -> int:
        if not self._free_rows:  # twice the rows, the old ones kept
            rows, width = self.array.shape
            grown = np.zeros((2 * rows, width), dtype=np.int32)
            grown[:rows] = self.array
            self.array = grown
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def release_row(self, row: int, num_blocks: int) -> None:
        self.array[row, :num_blocks] = 0  # zero past the end for the row's next owner
        self._free_rows.append(row)

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        """Set entries start.. of a row (widening the array when the table outgrows it)."""
        end = start + len(blocks)
        rows, width = self.array.shape
        if end > width:
            grown = np.zeros((rows, max(2 * width, end)), dtype=np.int32)
            grown[:, :width] = self.array
            self.array = grown
        self.array[row, start:end] = blocks

    def gather(self, rows: np.ndarray, width: int, out: np.ndarray) -> None:
        """out[i, :] = the first `width` entries of row rows[i] (zero past each table's end)."""
        np.take(self.array[:, :width], rows, axis=0, out=out, mode="clip")  # rows are live rows


class RequestState(PromptThenOutputTokens):
    """One request as the worker sees it (token ids on the host, block table, settings)."""

    __slots__ = ("req_id", "prompt_token_ids", "sampling_params", "block_ids", "output_token_ids", "_prompt_array",
                 "tables", "row")

    def __init__(self, new: NewRequest, tables: Optional[BlockTables] = None) -> None:
        self.req_id = new.req_id
        self.prompt_token_ids: list[int] = new.prompt_token_ids
        self.sampling_params: SamplingParams = new.sampling_params
        self.block_ids: list[int] = new.block_ids  # the NewRequest's own lists: the state takes them over
        self.output_token_ids: list[int] = new.output_token_ids
        self._prompt_array: Optional[np.ndarray] = None
        # The block table also as a row of int32 (BlockTables), written as blocks arrive: a step
        # gathers its requests' rows instead of converting ~L/16 Python ints per request.
        self.tables = tables if tables is not None else BlockTables()
        self.row = self.tables.take_row()
        self.tables.write(self.row, 0, self.block_ids)

    def add_blocks(self, blocks: list[int]) -> None:
        """Append blocks to the table (list and row)."""
        self.tables.write(self.row, len(self.block_ids), blocks)
        self.block_ids.extend(blocks)

    def release(self) -> None:
        """Give the table row back (the request is dropped)."""
        self.tables.release_row(self.row, len(self.block_ids))

    @property
    def block_array(self) -> np.ndarray:
        """[num_blocks] int32: the block table (a view; valid until the next add_blocks)."""
        return self.tables.array[self.row, : len(self.block_ids)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def prompt_array(self) -> np.ndarray:
        """The prompt as an int64 array, made on first use (penalties read it every step)."""
        if self._prompt_array is None:
            self._prompt_array = np.asarray(self.prompt_token_ids, dtype=np.int64)
        return self._prompt_array


class RequestStates(dict):
    """req id -> RequestState, updated from each step's input before the step runs; their block
    tables are rows of one BlockTables (`width`: the widest table expected, 0 = grow as needed)."""

    def __init__(self, width: int = 0) -> None:
        super().__init__()
        self.tables = BlockTables(width)

    def drop(self, rid: str) -> None:
        state = self.pop(rid, None)
        if state is not None:
            state.release()

    def apply(self, step: StepInput) -> None:
        for rid in step.finished_req_ids:
            self.drop(rid)
        for rid in step.preempted_req_ids:
            self.drop(rid)
        for new in step.new_requests:
            self.drop(new.req_id)
            self[new.req_id] = RequestState(new, self.tables)
        for rid, tokens in step.new_token_ids.items():
            self[rid].output_token_ids.extend(tokens)
        for rid, blocks in step.new_block_ids.items():
            self[rid].add_blocks(blocks)
