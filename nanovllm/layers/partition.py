"""Tensor-parallel sharding arithmetic: which rows and columns of each weight a rank holds.

Pure integer arithmetic (no torch), shared by the layers (the shapes they allocate), the
loaders (the slice of each checkpoint tensor a rank reads) and quantized linears (the same
slices of their own tensors, in their own units). Megatron-LM's split, as vLLM and nano-vLLM
do it:

- column-parallel (qkv, gate_up, the LM head): each rank holds a contiguous run of output
  rows, and of every packed part (its q heads, its kv heads, its halves of gate and up);
- row-parallel (o_proj, down_proj): each rank holds the input columns that match the
  column-parallel layer in front of it; the partial products are summed by an all-reduce;
- attention heads: q heads split evenly; kv heads split evenly when there are at least as
  many as ranks, else each kv head is replicated on `world_size // num_kv_heads` ranks (the
  ranks holding its q heads);
- vocabulary (embedding, LM head): padded to a multiple of the world size, each rank holds
  `padded // world_size` rows; the padding rows are zeros and never sampled.

Sizes that need not divide (the MLP's intermediate size) are split with sizes differing by
at most one. Heads must divide (a head is never cut): `check_head_counts` says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ShardId = Any  # a packed part's id ("q", "k", "v", 0, 1) or None for an unpacked tensor


@dataclass(frozen=True)
class ShardRange:
    """`size` consecutive items from `start` (rows or columns of a full tensor)."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def scaled(self, per_element: int, what: str = "range") -> "ShardRange":
        """The same range in units of `per_element` logical items (a packed int4 word holds 8
        input features, a group scale covers `group_size`); both ends must fall on a unit."""
        if per_element == 1:
            return self
        if self.start % per_element or self.size % per_element:
            raise ValueError(f"{what} [{self.start}, {self.end}) is not a multiple of {per_element}: this tensor "
                             f"cannot be split there; use a tensor_parallel_size that keeps each rank's share "
                             f"a multiple of {per_element}")
        return ShardRange(self.start // per_element, self.size // per_element)


def split_evenly(total: int, world_size: int, rank: int) -> ShardRange:
    """Rank's contiguous share of `total` items; shares differ by at most one (the first
    `total % world_size` ranks get the larger ones)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return ShardRange(start, base + (1 if rank < extra else 0))


# ----------------------------------------------------------------------------- attention heads


def check_head_counts(num_heads: int, num_kv_heads: int, world_size: int) -> None:
    """ValueError unless the heads can be split over `world_size` ranks."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size={world_size} must be at least 1")
    if num_heads % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} does not divide the model's {num_heads} attention "
                         f"heads; use one of {_divisors(num_heads)}")
    if num_kv_heads >= world_size and num_kv_heads % world_size:
        raise ValueError(f"tensor_parallel_size={world_size} does not divide the model's {num_kv_heads} KV heads; "
                         f"use one of {[d for d in _divisors(num_heads) if num_kv_heads % d == 0 or d % num_kv_heads == 0]}")
    if num_kv_heads < world_size and world_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={world_size} is not a multiple of the model's {num_kv_heads} KV heads "
                         f"(with fewer KV heads than ranks each KV head is replicated on an equal number of ranks)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one rank holds (global head indices)."""

    q_heads: ShardRange
    kv_heads: ShardRange
    kv_replicas: int  # ranks that hold each of this rank's kv heads (1 = split, > 1 = replicated)

    @property
    def num_heads(self) -> int:
        return self.q_heads.size

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads.size


def head_partition(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> HeadPartition:
    """Rank's q heads and the kv heads they attend with (q head h uses kv head
    h // (num_heads // num_kv_heads), so a rank's q heads always find their kv heads locally)."""
    check_head_counts(num_heads, num_kv_heads, world_size)
    q = split_evenly(num_heads, world_size, rank)
    if num_kv_heads >= world_size:
        return HeadPartition(q, split_evenly(num_kv_heads, world_size, rank), 1)
    replicas = world_size // num_kv_heads
    return HeadPartition(q, ShardRange(rank // replicas, 1), replicas)


# ----------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VocabPartition:
    """A rank's rows of the (padded) vocabulary."""

    vocab_size: int  # the model's
    padded_vocab_size: int  # a multiple of the world size
    rows: ShardRange  # this rank's rows of the padded vocabulary

    @property
    def num_real_rows(self) -> int:
        """Rows backed by the checkpoint (the rest are padding, zeros)."""
        return max(0, min(self.rows.end, self.vocab_size) - self.rows.start)

    @property
    def checkpoint_rows(self) -> ShardRange:
        return ShardRange(min(self.rows.start, self.vocab_size), self.num_real_rows)


def pad_vocab(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size


def vocab_partition(vocab_size: int, world_size: int, rank: int) -> VocabPartition:
    padded = pad_vocab(vocab_size, world_size)
    per_rank = padded // world_size
    return VocabPartition(vocab_size, padded, ShardRange(rank * per_rank, per_rank))


# ----------------------------------------------------------------------------- per-tensor loading


@dataclass(frozen=True)
class ParamShard:
    """The part of a checkpoint tensor that one rank's parameter holds (set as `param.tp_shard`).

    Along `dim`, for each packed part (None for an unpacked tensor), the range of the
    checkpoint tensor to read; `full_sizes` are the extents the checkpoint must have along
    `dim` (checked before slicing, so a wrong-shaped tensor is still an error). `skip`: this
    rank holds none of it and keeps zeros (a row-parallel bias, added by rank 0 only).
    """

    dim: int
    ranges: Mapping[ShardId, ShardRange]
    full_sizes: Mapping[ShardId, int]
    skip: bool = False


@dataclass(frozen=True)
class LinearPartition:
    """How one linear layer's logical weight `[out_features, in_features]` is split.

    Column-parallel layers split the output rows (`out_ranges`: per packed part, the rows of
    the checkpoint tensor this rank holds); row-parallel layers split the input columns
    (`in_range`) and sum the ranks' outputs. A quantized linear keeps the layer's partition
    and maps it onto its own tensors with `param_shard` (which dim holds output rows or input
    columns, how many logical items one element covers).
    """

    kind: str  # "replicated" | "column" | "row"
    out_full: Mapping[ShardId, int]  # logical output rows per packed part (None: unpacked)
    out_ranges: Mapping[ShardId, ShardRange]
    in_full: int
    in_range: ShardRange
    rank: int = 0
    world_size: int = 1
    local_out_offsets: Mapping[ShardId, int] = field(default_factory=dict)  # part -> first local row

    @property
    def reduces_output(self) -> bool:
        """The rank's output is a partial sum: an all-reduce completes it."""
        return self.kind == "row" and self.world_size > 1

    @property
    def local_out_features(self) -> int:
        return sum(r.size for r in self.out_ranges.values())

    @property
    def local_in_features(self) -> int:
        return self.in_range.size

    def param_shard(self, out_dim: Optional[int] = None, in_dim: Optional[int] = None, out_per_element: int = 1,
                    in_per_element: int = 1, is_bias: bool = False) -> Optional[ParamShard]:
        """The ParamShard of a tensor of this layer whose dim `out_dim` runs over output rows
        and `in_dim` over input columns (None: the tensor has no such dim); None when the
        rank reads the whole tensor."""
        if self.world_size == 1 or self.kind == "replicated":
            return None
        if self.kind == "column" and out_dim is not None:
            return ParamShard(out_dim, {s: r.scaled(out_per_element, f"output rows of part {s!r}")
                                        for s, r in self.out_ranges.items()},
                              {s: _exact_div(n, out_per_element) for s, n in self.out_full.items()})
        if self.kind == "row":
            if in_dim is not None:
                return ParamShard(in_dim, {None: self.in_range.scaled(in_per_element, "input columns")},
                                  {None: _exact_div(self.in_full, in_per_element)})
            if is_bias:  # one copy of the bias in the sum: rank 0's
                return ParamShard(0, {s: ShardRange(0, n) for s, n in self.out_full.items()}, dict(self.out_full),
                                  skip=self.rank != 0)
        return None


def _exact_div(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"{n} is not a multiple of {d}")
    return n // d


def replicated_linear(in_features: int, out_parts: Mapping[ShardId, int]) -> LinearPartition:
    return LinearPartition("replicated", dict(out_parts), {s: ShardRange(0, n) for s, n in out_parts.items()},
                           in_features, ShardRange(0, in_features), local_out_offsets=_offsets(out_parts))


def column_linear(in_features: int, out_ranges: Mapping[ShardId, ShardRange], out_full: Mapping[ShardId, int],
                  world_size: int, rank: int) -> LinearPartition:
    """Output rows split: `out_ranges` are this rank's rows of each packed part."""
    sizes = {s: r.size for s, r in out_ranges.items()}
    return LinearPartition("column", dict(out_full), dict(out_ranges), in_features, ShardRange(0, in_features),
                           rank, world_size, _offsets(sizes))


def even_column_linear(in_features: int, out_parts: Mapping[ShardId, int], world_size: int,
                       rank: int) -> LinearPartition:
    """Each packed part's rows split evenly over the ranks (gate and up halves, a plain layer)."""
    return column_linear(in_features, {s: split_evenly(n, world_size, rank) for s, n in out_parts.items()},
                         out_parts, world_size, rank)


def row_linear(in_features: int, out_features: int, world_size: int, rank: int,
               in_range: Optional[ShardRange] = None) -> LinearPartition:
    """Input columns split (evenly unless `in_range` says which); every rank has all outputs."""
    in_range = in_range or split_evenly(in_features, world_size, rank)
    return LinearPartition("row", {None: out_features}, {None: ShardRange(0, out_features)}, in_features, in_range,
                           rank, world_size, {None: 0})


def _offsets(sizes: Mapping[ShardId, int]) -> dict:
    out, offset = {}, 0
    for s, n in sizes.items():
        out[s] = offset
        offset += n
    return out
