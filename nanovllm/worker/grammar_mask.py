"""Structured output, the worker's half: mask one step's logits with the token bitmasks the
engine's grammar matchers filled (engine/structured_output.py), sent in StepInput.

    grammar_rows_to_device   StepInput's host bitmask [R, W] int32 and row list -> device tensors
    apply_token_bitmask_     masks the disallowed logits with -inf, in place, on the rows
                             that have a grammar (one masked fill; xgrammar's Triton kernel
                             on CUDA, `apply_token_bitmask_reference` elsewhere)
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from nanovllm.worker.sampling_batch import to_device_async

BITS_PER_WORD = 32  # xgrammar's bitmask layout: bit j of int32 word w = token 32 w + j


def grammar_rows_to_device(bitmask: np.ndarray, rows: Sequence[int],
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask [R, W] int32, rows [R] int64) on `device`, copied without waiting for the device."""
    if bitmask.ndim != 2 or bitmask.shape[0] != len(rows):  # engine invariant, not user input
        raise RuntimeError(f"grammar bitmask of shape {bitmask.shape} for {len(rows)} rows")
    mask = to_device_async(torch.from_numpy(np.ascontiguousarray(bitmask, dtype=np.int32)), device)  # [R, W]
    return mask, to_device_async(torch.tensor(list(rows), dtype=torch.int64), device)  # [R]

def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Pure torch: logits[rows[k], t] = -inf where bit t of bitmask[k] is 0.

    logits: [B, V] float; bitmask: [R, W] int32 with W >= ceil(V / 32); rows: [R] int64 (all
    three on one device).
    """
    vocab_size = logits.shape[-1]
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=logits.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]: bit j of word w = token 32 w + j
    disallowed = (bits == 0).flatten(1)[:, :vocab_size]  # [R, V]
    logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(disallowed, float("-inf")))


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor,
                         use_kernel: Optional[bool] = None) -> None:
    """Mask `logits` [B, V] in place: row rows[k] with bitmask[k] ([R, W] int32, device).

    On CUDA this is xgrammar's Triton kernel on the grammar rows (gathered when they are not
    the whole batch; no host sync); elsewhere the torch reference. `use_kernel` forces the
    choice (tests run xgrammar's CPU kernel).
    """
    if use_kernel is None:
        use_kernel = logits.is_cuda
    if not use_kernel:
        apply_token_bitmask_reference(logits, bitmask, rows)
        return
    import xgrammar as xgr  # installed wherever a grammar row can exist (the engine compiled it)

    backend = "triton" if logits.is_cuda else "cpu"
    if rows.shape[0] == logits.shape[0]:  # every row has a grammar, in order (rows come sorted)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], backend=backend)
        return
    sub = logits.index_select(0, rows)  # [R, V]
    xgr.apply_token_bitmask_inplace(sub, bitmask, vocab_size=logits.shape[-1], backend=backend)
    logits.index_copy_(0, rows, sub)
