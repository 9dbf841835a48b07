"""Balanced split-KV decode: the host-side work list (numpy only, no Triton).

Why. The uniform split (`paged_attention.choose_num_splits`) gives every sequence of a decode
batch the same number of splits, chosen from the batch size alone. With mixed context
lengths (the throughput workload: 100 to 2,048 keys) a program of a long sequence then reads
up to ~20x the keys of a short one, and from batch ~33 up (one split each) the step waits for
the few programs that carry the longest contexts: the GPU's last wave runs mostly empty.

The balanced plan cuts every sequence into splits of about the same number of keys: the
batch's total keys over the items it may use (`plan_items`: two per sequence, or enough to
give each SM two programs), rounded up to whole key tiles. No program then reads more than
about the mean context, long sequences are spread over several SMs, and the items are
listed longest first (the last wave holds the short remainders).

The plan is computed per step from the host's sequence lengths (`build_plan`, a few numpy
calls), travels with the step's other inputs in the one host-to-device copy, and has a fixed
number of rows per batch size (unused rows: seq = -1), so a CUDA graph captured per batch
size replays any plan. Row layout (int32, PLAN_COLUMNS): the sequence, the split index, the
sequence's number of splits, the first partial-result row of the sequence, keys per split.
"""

from __future__ import annotations

import numpy as np

PLAN_SEQ, PLAN_SPLIT, PLAN_NUM_SPLITS, PLAN_PART_BASE, PLAN_KEYS_PER_SPLIT = range(5)
PLAN_COLUMNS = 5
KEY_TILE = 64  # splits are whole tiles of the decode kernel (paged_attention.DECODE_TILE_N)
DEFAULT_NUM_SMS = 132  # H100 / H200; used off CUDA
ITEMS_PER_SEQ = 2  # work items per sequence: splits of about the batch's mean context
PROGRAMS_PER_SM = 2  # small batches: at least this many (item, KV head) programs per SM


def _cdiv(a, b):
    return -(-a // b)


def plan_items(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Rows of the plan of a decode batch of num_seqs (a function of the batch size only, so a
    CUDA graph per batch size holds any step's plan)."""
    return max(ITEMS_PER_SEQ * num_seqs, _cdiv(PROGRAMS_PER_SM * num_sms, num_kv_heads), num_seqs + 1)


def keys_per_split(seq_lens: np.ndarray, num_items: int, tile_n: int) -> int:
    """Keys per split so that sum(cdiv(len, K)) <= num_items: K >= total / (num_items - num_seqs),
    because each sequence's split count exceeds len / K by less than one."""
    num_seqs = len(seq_lens)
    spare = max(num_items - num_seqs, 1)
    k = _cdiv(int(np.maximum(seq_lens, 1).sum()), spare)
    return max(tile_n, _cdiv(k, tile_n) * tile_n)


def build_plan(seq_lens: np.ndarray, num_items: int, tile_n: int, out: np.ndarray = None) -> np.ndarray:
    """[num_items, PLAN_COLUMNS] int32 work list of a decode batch with context lengths seq_lens.

    Every sequence gets cdiv(len, K) splits (an empty one gets one, so its output is written);
    its partial results occupy rows part_base .. part_base + splits - 1 (split order), while
    the rows of the list are ordered by keys, longest first. `out` (e.g. a view of a staging
    buffer) is filled in place when given.
    """
    num_seqs = len(seq_lens)
    if num_items < num_seqs + 1:
        raise ValueError(f"a plan of {num_items} items cannot hold {num_seqs} sequences (see plan_items)")
    lens = np.maximum(np.asarray(seq_lens, dtype=np.int64), 1)  # [B]
    k = keys_per_split(lens, num_items, tile_n)
    splits = _cdiv(lens, k)  # [B]
    total = int(splits.sum())
    base = np.zeros(num_seqs, dtype=np.int64)
    np.cumsum(splits[:-1], out=base[1:])
    seq = np.repeat(np.arange(num_seqs), splits)  # [total]
    split = np.arange(total) - np.repeat(base, splits)
    keys = np.minimum(k, lens[seq] - split * k)  # [total] keys of each item
    order = np.argsort(-keys, kind="stable")  # longest first
    plan = out if out is not None else np.empty((num_items, PLAN_COLUMNS), dtype=np.int32)
    plan[:total, PLAN_SEQ] = seq[order]
    plan[:total, PLAN_SPLIT] = split[order]
    plan[:total, PLAN_NUM_SPLITS] = splits[seq[order]]
    plan[:total, PLAN_PART_BASE] = base[seq[order]]
    plan[:, PLAN_KEYS_PER_SPLIT] = k
    plan[total:, :PLAN_KEYS_PER_SPLIT] = -1
    return plan
