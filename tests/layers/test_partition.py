"""Tensor-parallel sharding arithmetic: every item is held exactly once (or replicated as
intended), q heads find their kv heads on their own rank, the vocabulary is padded to a
multiple of the world size, and sizes that cannot be split are refused with a clear message.
"""

import pytest
import torch

from nanovllm.layers.partition import (ShardRange, check_head_counts, even_column_linear, head_partition, pad_vocab,
                                       row_linear, split_evenly, vocab_partition)
from nanovllm.loading.weights import read_shard
from nanovllm.layers.linear import WeightShapeError


@pytest.mark.parametrize("total", [0, 1, 7, 64, 100, 101, 4099])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_split_evenly_covers_everything_once_in_order(total, world):
    shares = [split_evenly(total, world, r) for r in range(world)]
    assert shares[0].start == 0 and shares[-1].end == total
    assert all(a.end == b.start for a, b in zip(shares, shares[1:]))  # contiguous, in rank order
    sizes = [s.size for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _valid_layouts():
    for heads in (1, 2, 4, 6, 8, 12, 14, 16, 32, 40, 64):
        for kv in (k for k in range(1, heads + 1) if heads % k == 0):
            for world in (1, 2, 3, 4, 8):
                if heads % world == 0 and (kv % world == 0 if kv >= world else world % kv == 0):
                    yield heads, kv, world


@pytest.mark.parametrize("heads,kv,world", list(_valid_layouts()))
def test_head_partition_keeps_each_q_head_with_its_kv_head(heads, kv, world):
    group = heads // kv  # q heads per kv head (GQA)
    parts = [head_partition(heads, kv, world, r) for r in range(world)]
    q_held = [h for p in parts for h in range(p.q_heads.start, p.q_heads.end)]
    assert q_held == list(range(heads))  # every q head exactly once, in order
    for p in parts:
        assert p.num_heads == heads // world
        kv_here = range(p.kv_heads.start, p.kv_heads.end)
        assert all(h // group in kv_here for h in range(p.q_heads.start, p.q_heads.end))
        # and a rank's local q head i uses its local kv head i // (local group), as attention computes it
        local_group = p.num_heads // p.num_kv_heads
        assert all((h // group) - p.kv_heads.start == (h - p.q_heads.start) // local_group
                   for h in range(p.q_heads.start, p.q_heads.end))
    kv_held = [h for p in parts for h in range(p.kv_heads.start, p.kv_heads.end)]
    if kv >= world:
        assert kv_held == list(range(kv)) and all(p.kv_replicas == 1 for p in parts)
    else:  # fewer kv heads than ranks: each one replicated on world // kv ranks
        assert sorted(kv_held) == sorted(list(range(kv)) * (world // kv))
        assert all(p.num_kv_heads == 1 and p.kv_replicas == world // kv for p in parts)


@pytest.mark.parametrize("heads,kv,world,match", [
    (6, 2, 4, "does not divide the model's 6 attention heads"),
    (14, 2, 4, "does not divide the model's 14 attention heads"),
    (12, 6, 4, "does not divide the model's 6 KV heads"),
    (12, 4, 6, "not a multiple of the model's 4 KV heads"),
    (4, 1, 0, "at least 1"),
])
def test_head_counts_that_cannot_be_split_are_refused(heads, kv, world, match):
    with pytest.raises(ValueError, match=match):
        check_head_counts(heads, kv, world)


def test_the_refusal_names_the_sizes_that_work():
    with pytest.raises(ValueError, match=r"use one of \[1, 2, 3, 6\]"):
        check_head_counts(6, 6, 4)


@pytest.mark.parametrize("vocab,world", [(1000, 1), (1003, 2), (777, 2), (151936, 8), (5, 4), (1, 4), (32000, 3)])
def test_vocab_partition_pads_to_a_multiple_of_the_world_size(vocab, world):
    padded = pad_vocab(vocab, world)
    assert padded % world == 0 and vocab <= padded < vocab + world
    parts = [vocab_partition(vocab, world, r) for r in range(world)]
    assert all(p.padded_vocab_size == padded and p.rows.size == padded // world for p in parts)
    real = [t for p in parts for t in range(p.checkpoint_rows.start, p.checkpoint_rows.end)]
    assert real == list(range(vocab))  # each real token row read by exactly one rank, in order
    assert sum(p.rows.size - p.num_real_rows for p in parts) == padded - vocab  # the rest is padding


def test_column_then_row_partitions_line_up():
    """gate_up's rows of a rank are exactly down_proj's columns of that rank (odd sizes too)."""
    for inter, world in ((100, 2), (101, 2), (101, 3), (7, 4)):
        for r in range(world):
            col = even_column_linear(64, {0: inter, 1: inter}, world, r)
            row = row_linear(inter, 64, world, r)
            assert col.out_ranges[0] == col.out_ranges[1] == row.in_range
            assert col.local_out_features == 2 * row.local_in_features
            assert col.local_out_offsets == {0: 0, 1: row.local_in_features}


def test_param_shard_maps_a_partition_onto_a_packed_tensor():
    """What a quantized linear does: codes packed 8 per int32 along K, one scale per 32 columns."""
    row = row_linear(256, 64, 2, 1)
    qweight = row.param_shard(out_dim=1, in_dim=0, in_per_element=8)  # GPTQ qweight [K / 8, N]
    assert qweight.dim == 0 and qweight.ranges[None] == ShardRange(16, 16) and qweight.full_sizes[None] == 32
    scales = row.param_shard(out_dim=1, in_dim=0, in_per_element=32)  # [K / 32, N]
    assert scales.ranges[None] == ShardRange(4, 4)
    assert row.param_shard(out_dim=0, is_bias=True).skip  # rank 1 adds no bias
    assert not row_linear(256, 64, 2, 0).param_shard(out_dim=0, is_bias=True).skip
    col = even_column_linear(256, {"q": 128, "k": 64}, 2, 1)
    packed = col.param_shard(out_dim=1, in_dim=0, out_per_element=8)  # AWQ qweight [K, N / 8]
    assert packed.dim == 1 and packed.ranges == {"q": ShardRange(8, 8), "k": ShardRange(4, 4)}
    with pytest.raises(ValueError, match="not a multiple of 32"):
        row_linear(200, 64, 2, 1).param_shard(in_dim=0, in_per_element=32)
    assert even_column_linear(256, {None: 64}, 1, 0).param_shard(out_dim=0) is None  # world 1: whole tensors


class _LazyTensor:
    """Records which slices the loader reads (a safetensors file read lazily)."""

    def __init__(self, t):
        self.t, self.shape, self.reads = t, t.shape, []

    def narrow(self, dim, start, length):
        self.reads.append((dim, start, length))
        return self.t.narrow(dim, start, length)

    def load(self):
        self.reads.append("all")
        return self.t


def test_the_loader_reads_only_the_rank_slice_and_checks_the_full_extent():
    full = torch.arange(12 * 5, dtype=torch.float32).view(12, 5)
    spec = even_column_linear(5, {"q": 8, "k": 4}, 2, 1).param_shard(out_dim=0, in_dim=1)
    lazy = _LazyTensor(full[:8])
    part = read_shard(lazy, spec, "q", "q_proj.weight")
    assert lazy.reads == [(0, 4, 4)] and torch.equal(part, full[4:8])
    with pytest.raises(WeightShapeError, match="expected 4 along dim 0"):
        read_shard(_LazyTensor(full[:6]), spec, "k", "k_proj.weight")  # a wrong-sized checkpoint tensor
    whole = _LazyTensor(full)
    assert torch.equal(read_shard(whole, None, None, "x"), full) and whole.reads == ["all"]
