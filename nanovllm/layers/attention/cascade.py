"""Cascade plans: which query rows read which run of shared KV blocks once (host side, numpy).

Each step the worker's model runner asks `plan_cascade` for a plan over the step's block
tables (the numpy arrays it is about to copy to the device); attention layers then compute
every sequence's attention as a log-sum-exp merge of two parts (kernels/cascade_attention.py
on the GPU, `torch_backend.cascade_decode` on the CPU):

- the *shared* part: keys 0 .. P*block_size - 1 of one block table, for a tile of query rows
  that all see them, computed once for the whole tile;
- the *suffix* part: each sequence's own remaining keys, through the usual kernels on a
  block table shifted by the P blocks it shares (its `suffix_block_tables` row).

Two kinds of prefix, each chosen by a rule (`CascadeRule`, thresholds below):

1. Decode groups. Requests whose block tables start with the same physical blocks (a system
   prompt shared through the prefix cache, the n > 1 completions of one prompt) share those
   blocks' K/V: the decode kernel would read them once per request, a group reads them once.
   Found in O(batch) numpy work: candidates grouped by their first block id, then each
   member's run of equal block ids against the group's leader. A group is used when it has
   >= `min_requests` requests, shares >= `min_shared_tokens` tokens, and the keys it saves,
   (requests - 1) x shared tokens, reach `min_saved_keys` (the extra launches and the merge
   must be paid for). Only whole blocks strictly before every member's current token are
   shared, so the rule holds for a prefix that ends mid-block and never touches a block a
   member is writing.
2. Prefill-chunk contexts (GPU only). A chunk whose cached context is at least
   `chunk_min_context` tokens, while the step's chunks so split hold at most
   `chunk_max_tokens` tokens: its whole context blocks are a prefix of all its tokens. The unified kernel would walk that context in one program per
   query tile (tens of programs for thousands of keys); the shared-prefix kernel splits it
   over the GPU, so a decode step that carries a chunk of a long prompt stays short.

Ignoring a plan is always correct: the step's full block tables and lengths stay in the
ForwardContext, so a layer that cannot use a plan (a sliding window) attends as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from nanovllm.config import CASCADE_MODES
from nanovllm.kernels.launch_math import CASCADE_TILE_COLUMNS as TILE_COLUMNS
from nanovllm.kernels.launch_math import cdiv

CASCADE_MIN_REQUESTS = 2
CASCADE_MIN_SHARED_TOKENS = 256  # 16 blocks of 16: shorter shared prefixes are not worth a group
# (requests - 1) x shared tokens. At Qwen3-0.6B shapes (4 KiB of K/V per token and layer) 4,096
# keys are 16 MiB per layer, ~4 us of H200 bandwidth: the two extra launches' cost.
CASCADE_MIN_SAVED_KEYS = 4096
CASCADE_MAX_GROUPS = 4  # per step; bounds a CUDA graph's tile capacity
CASCADE_CHUNK_MIN_CONTEXT = 1024  # tokens of cached context before a chunk's context is split off
CASCADE_CHUNK_MAX_TOKENS = 512  # per step: more chunk tokens have query tiles enough to fill the GPU themselves


@dataclass(frozen=True)
class CascadeRule:
    """When a shared prefix is worth its own kernel (see the module docstring)."""

    min_requests: int = CASCADE_MIN_REQUESTS
    min_shared_tokens: int = CASCADE_MIN_SHARED_TOKENS
    min_saved_keys: int = CASCADE_MIN_SAVED_KEYS
    max_groups: int = CASCADE_MAX_GROUPS
    chunk_min_context: Optional[int] = CASCADE_CHUNK_MIN_CONTEXT  # None: never split a chunk's context
    chunk_max_tokens: int = CASCADE_CHUNK_MAX_TOKENS


def cascade_rule(mode: str, chunk_contexts: bool) -> Optional[CascadeRule]:
    """The rule of an engine's `cascade_attention` mode: "auto" = the thresholds above,
    "force" = any whole shared block and any chunk context (tests, A/B runs), "off" = None.
    `chunk_contexts=False` (the CPU path) never splits a chunk's context."""
    if mode not in CASCADE_MODES:
        raise ValueError(f"cascade_attention={mode!r}: use one of {CASCADE_MODES}")
    if mode == "off":
        return None
    rule = CascadeRule() if mode == "auto" else CascadeRule(min_shared_tokens=1, min_saved_keys=0,
                                                            chunk_min_context=1, chunk_max_tokens=1 << 30)
    if not chunk_contexts:
        rule = CascadeRule(rule.min_requests, rule.min_shared_tokens, rule.min_saved_keys, rule.max_groups, None,
                           rule.chunk_max_tokens)
    return rule


@dataclass(frozen=True)
class SharedPrefix:
    """One run of shared keys and the query rows that read it once."""

    rows: np.ndarray  # [R] query rows (token indices of the batch)
    seqs: np.ndarray  # [n] sequences whose suffix tables skip these blocks
    table_row: int  # the sequence whose block table holds the shared blocks
    shared_len: int  # keys (whole blocks)


@dataclass
class CascadePlan:
    """A step's plan as host arrays (the model runner copies them to the device)."""

    suffix_block_tables: np.ndarray  # [num_seqs, width] int32: each table without its shared blocks
    suffix_seq_lens: np.ndarray  # [num_seqs] int32: seq_lens minus the shared keys
    tiles: np.ndarray  # [num_tiles, TILE_COLUMNS] int32 (spare tiles: all 0)
    query_rows: np.ndarray  # [num_tiles * queries_per_tile] int32, -1 = empty slot
    queries_per_tile: int
    prefixes: list[SharedPrefix]
    max_suffix_len: int
    max_shared_len: int

    @property
    def num_live_tiles(self) -> int:
        return int(np.count_nonzero(self.tiles[:, 0]))


def _decode_groups(tables, seq_lens, decode_seqs, block_size, rule):
    """[(members, shared blocks)] of decode sequences that share leading physical blocks."""
    min_blocks = max(1, cdiv(rule.min_shared_tokens, block_size))
    full = (seq_lens[decode_seqs] - 1) // block_size  # whole blocks before each one's current token
    cand = decode_seqs[full >= min_blocks]
    if len(cand) < rule.min_requests:
        return []
    full_of = np.zeros(len(seq_lens), dtype=np.int64)  # [num_seqs] whole blocks before the current token
    full_of[decode_seqs] = full
    first = tables[cand, 0]
    order = np.argsort(first, kind="stable")
    cand, first = cand[order], first[order]
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    ends = np.r_[starts[1:], len(cand)]
    big = ends - starts >= rule.min_requests  # runs too short to form a group are skipped without a look
    groups = []
    for s, e in zip(starts[big].tolist(), ends[big].tolist()):
        members = cand[s:e]
        while len(members) >= rule.min_requests:
            leader = int(members[0])
            limit = np.minimum(full_of[members], full_of[leader])  # [g]
            width = int(limit.max())
            same = tables[members, :width] == tables[leader, :width]  # [g, width]
            match = np.where(same.all(axis=1), width, np.argmin(same, axis=1))
            match = np.minimum(match, limit)  # [g] shared blocks with the leader (the leader: all its own)
            # Largest saving: the top-k members by match share min(top k) blocks.
            by_match = np.argsort(-match, kind="stable")
            m_sorted = match[by_match]
            k = np.arange(1, len(members) + 1)
            saving = (k - 1) * m_sorted  # [g] keys not re-read if the top k form the group
            best = int(np.argmax(saving[::-1]))  # ties: the larger group
            best = len(members) - 1 - best
            size, blocks = best + 1, int(m_sorted[best])
            if (size < rule.min_requests or blocks < min_blocks
                    or (size - 1) * blocks * block_size < rule.min_saved_keys):
                break
            groups.append((np.sort(members[by_match[:size]]), blocks))
            members = members[np.sort(by_match[size:])]
    return groups


def plan_cascade(
    block_tables: np.ndarray,  # [num_seqs, width] int32 (entries past a table's end: anything)
    seq_lens: np.ndarray,  # [num_seqs] context length after this step
    query_start_loc: np.ndarray,  # [num_seqs + 1]
    block_size: int,
    queries_per_tile: int,
    rule: CascadeRule,
    max_tiles: Optional[int] = None,  # tile capacity (a CUDA graph's); None = unbounded
    pad_tiles: bool = False,  # pad tiles / query rows to max_tiles (graph replays copy fixed sizes)
) -> Optional[CascadePlan]:
    """The step's shared prefixes under `rule`, or None when none is worth it."""
    num_seqs = len(seq_lens)
    q_lens = np.diff(query_start_loc[: num_seqs + 1])
    decode_seqs = np.flatnonzero(q_lens == 1)
    groups = _decode_groups(block_tables, seq_lens, decode_seqs, block_size, rule)
    groups.sort(key=lambda g: -(len(g[0]) - 1) * g[1])  # most keys saved first
    prefixes = [(members, blocks, None) for members, blocks in groups[: rule.max_groups]]
    if rule.chunk_min_context is not None:
        context = seq_lens - q_lens
        chunks = np.flatnonzero((q_lens > 1) & (q_lens <= rule.chunk_max_tokens)
                                & (context // block_size * block_size >= max(rule.chunk_min_context, 1)))
        chunk_rows = 0
        for i in chunks.tolist():
            chunk_rows += int(q_lens[i])
            if chunk_rows > rule.chunk_max_tokens:
                break  # the unified kernel has query tiles enough to fill the GPU by now
            rows = np.arange(query_start_loc[i], query_start_loc[i + 1], dtype=np.int32)
            prefixes.append((np.array([i]), int(context[i]) // block_size, rows))
    if not prefixes:
        return None

    shift = np.zeros(num_seqs, dtype=np.int64)  # shared blocks per sequence
    tiles, query_rows, chosen = [], [], []
    qpt = queries_per_tile
    for seqs, blocks, rows in prefixes:
        if rows is None:  # decode group: one row per sequence
            rows = query_start_loc[seqs].astype(np.int32)
        n_tiles = cdiv(len(rows), qpt)
        if max_tiles is not None and len(tiles) + n_tiles > max_tiles:
            continue
        shift[seqs] = blocks
        shared_len = blocks * block_size
        for c in range(0, len(rows), qpt):
            part = rows[c : c + qpt]
            tiles.append((len(part), shared_len, int(seqs[0])))
            query_rows.append(part)
        chosen.append(SharedPrefix(rows, seqs, int(seqs[0]), shared_len))
    if not chosen:
        return None
    num_tiles = max_tiles if pad_tiles and max_tiles is not None else len(tiles)
    tile_arr = np.zeros((num_tiles, TILE_COLUMNS), dtype=np.int32)
    tile_arr[: len(tiles)] = tiles
    rows_arr = np.full(num_tiles * qpt, -1, dtype=np.int32)
    for t, part in enumerate(query_rows):  # each tile's slots, the unused ones left at -1
        rows_arr[t * qpt : t * qpt + len(part)] = part
    width = block_tables.shape[1]
    idx = np.minimum(np.arange(width)[None, :] + shift[:, None], width - 1)  # [num_seqs, width]
    suffix_tables = np.take_along_axis(block_tables, idx, axis=1).astype(np.int32, copy=False)
    suffix_lens = (seq_lens - shift * block_size).astype(np.int32)
    return CascadePlan(suffix_tables, suffix_lens, tile_arr, rows_arr, qpt, chosen, int(suffix_lens.max()),
                       max(p.shared_len for p in chosen))
