"""Cascade plans (layers/attention/cascade.py) and the attention that follows them.

The planner is plain numpy: groups of decode requests that share leading physical blocks,
prefill chunks whose cached context is split off, the rule's thresholds, the tile capacity
of a CUDA graph. Then plans over random sharing structures drive the CPU path
(`torch_backend.cascade_decode`) and the Triton path (kernels under the interpreter), which
must both equal plain paged attention on the full block tables.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.kernels import reference
from nanovllm.kernels.launch_math import cascade_queries_per_tile
from nanovllm.layers.attention import torch_backend
from nanovllm.layers.attention.cascade import (CASCADE_MIN_SAVED_KEYS, CascadeRule, cascade_rule, plan_cascade)
from nanovllm.layers.forward_context import CascadeInputs, ForwardContext

BS = 16
FORCE = cascade_rule("force", chunk_contexts=True)
AUTO = cascade_rule("auto", chunk_contexts=True)


def tables_for(seq_lens, shared, seed=0, width=None):
    """Block tables: sequence i's first n blocks are sequence j's when shared[i] = (j, n)."""
    rng = np.random.default_rng(seed)
    nblocks = [-(-s // BS) for s in seq_lens]
    width = width or max(nblocks) + 2
    ids = rng.permutation(sum(nblocks) + 10).astype(np.int32) + 1  # block 0 stays free: padding reads as 0
    tables = np.zeros((len(seq_lens), width), dtype=np.int32)
    used = 0
    for i, n in enumerate(nblocks):
        tables[i, :n] = ids[used : used + n]
        used += n
        if shared[i] is not None:
            j, k = shared[i]
            tables[i, :k] = tables[j, :k]
    return tables


def decode_plan(seq_lens, shared, rule=FORCE, **kw):
    tables = tables_for(seq_lens, shared)
    qsl = np.arange(len(seq_lens) + 1)
    return plan_cascade(tables, np.array(seq_lens), qsl, BS, 4, rule, **kw), tables


def groups_of(plan):
    return sorted((sorted(p.seqs.tolist()), p.shared_len // BS) for p in plan.prefixes)


def test_no_shared_blocks_no_plan():
    plan, _ = decode_plan([40, 50, 60], [None, None, None])
    assert plan is None


def test_system_prompt_group_and_suffix_tables():
    lens = [200, 210, 190, 400, 37]
    plan, tables = decode_plan(lens, [None, (0, 10), (0, 10), (0, 10), None])
    assert groups_of(plan) == [([0, 1, 2, 3], 10)]
    for i in range(4):  # each suffix table is its own table after the 10 shared blocks
        n = -(-lens[i] // BS) - 10
        assert plan.suffix_block_tables[i, :n].tolist() == tables[i, 10 : 10 + n].tolist()
        assert plan.suffix_seq_lens[i] == lens[i] - 160
    assert plan.suffix_block_tables[4].tolist() == tables[4].tolist() and plan.suffix_seq_lens[4] == 37
    assert plan.tiles.tolist() == [[4, 160, 0]]
    assert plan.query_rows.tolist() == [0, 1, 2, 3]
    assert plan.max_shared_len == 160 and plan.max_suffix_len == 400 - 160


def test_prefix_ending_mid_block_shares_only_whole_blocks():
    """A 330-token prompt: 20 whole blocks shared, the 21st (10 tokens) is each request's own."""
    lens = [331, 335, 340]
    plan, _ = decode_plan(lens, [None, (0, 20), (0, 20)])
    assert groups_of(plan) == [([0, 1, 2], 20)]


def test_current_token_block_is_never_shared():
    """A member at seq_len 320 has its current token in block 19: at most 19 blocks are shared."""
    plan, _ = decode_plan([321, 320], [None, (0, 20)])
    assert groups_of(plan) == [([0, 1], 19)]


def test_two_prefixes_and_a_diverging_run():
    """Same first block for all six, then two families: one group each, with its own length."""
    lens = [500] * 6
    shared = [None, (0, 30), (0, 30), (0, 1), (3, 25), (3, 25)]
    plan, _ = decode_plan(lens, shared)
    assert groups_of(plan) == [([0, 1, 2], 30), ([3, 4, 5], 25)]


def test_the_group_maximises_the_saved_keys():
    """Three requests share 30 blocks, a fourth only 2 of them: the group leaves it out."""
    plan, _ = decode_plan([500] * 4, [None, (0, 30), (0, 30), (0, 2)])
    assert groups_of(plan) == [([0, 1, 2], 30)]


def test_auto_rule_thresholds():
    shared = [None] + [(0, 20)] * 3  # 4 requests x 320 tokens: (4 - 1) x 320 keys saved
    plan, _ = decode_plan([400] * 4, shared, rule=AUTO)
    assert plan is None and 3 * 320 < CASCADE_MIN_SAVED_KEYS
    long_shared = [None] + [(0, 128)] * 3  # 2,048 shared tokens
    plan, _ = decode_plan([2100] * 4, long_shared, rule=AUTO)
    assert groups_of(plan) == [([0, 1, 2, 3], 128)]
    plan, _ = decode_plan([2100, 2100], [None, (0, 128)], rule=AUTO)  # 2 requests: saves 2,048 keys only
    assert plan is None
    strict = CascadeRule(min_requests=5, min_shared_tokens=16, min_saved_keys=0)
    assert decode_plan([2100] * 4, long_shared, rule=strict)[0] is None


def test_tile_capacity_and_padding():
    shared_a = [None] + [(0, 10)] * 5  # 6 requests -> 2 tiles of 4
    lens = [300] * 6 + [300] * 2
    shared = shared_a + [None, (6, 12)]
    plan, _ = decode_plan(lens, shared)
    assert plan.num_live_tiles == 3
    plan, _ = decode_plan(lens, shared, max_tiles=2)  # the 6-request group's 2 tiles fit, the other does not
    assert groups_of(plan) == [([0, 1, 2, 3, 4, 5], 10)] and plan.suffix_seq_lens[6] == 300
    plan, _ = decode_plan(lens, shared, max_tiles=5, pad_tiles=True)
    assert plan.tiles.shape == (5, 3) and plan.tiles[3:].tolist() == [[0, 0, 0]] * 2
    assert plan.query_rows.shape == (20,) and (plan.query_rows[12:] == -1).all()
    assert decode_plan(lens, shared_a + [None, None], max_tiles=1)[0] is None


def test_max_groups():
    lens = [300] * 10
    shared = [None, (0, 10), None, (2, 10), None, (4, 10), None, (6, 10), None, (8, 10)]
    plan, _ = decode_plan(lens, shared, rule=CascadeRule(min_shared_tokens=16, min_saved_keys=0, max_groups=3))
    assert len(plan.prefixes) == 3


def test_chunk_context_is_split_off():
    """Mixed batch: a 9-token chunk over a 100-token context (6 whole blocks) and two decodes."""
    seq_lens = np.array([109, 40, 41])
    qsl = np.array([0, 9, 10, 11])
    tables = tables_for(seq_lens.tolist(), [None, None, (1, 2)])
    plan = plan_cascade(tables, seq_lens, qsl, BS, 4, FORCE)
    assert groups_of(plan) == [([0], 6), ([1, 2], 2)]
    chunk = next(p for p in plan.prefixes if p.seqs.tolist() == [0])
    assert chunk.rows.tolist() == list(range(9))
    assert plan.suffix_seq_lens.tolist() == [109 - 96, 40 - 32, 41 - 32]
    assert plan_cascade(tables, seq_lens, qsl, BS, 4, AUTO) is None  # 100 tokens: below the auto threshold
    small = CascadeRule(min_shared_tokens=16, min_saved_keys=0, chunk_min_context=16, chunk_max_tokens=8)
    assert groups_of(plan_cascade(tables, seq_lens, qsl, BS, 4, small)) == [([1, 2], 2)]  # 9 chunk tokens > 8
    no_chunks = cascade_rule("force", chunk_contexts=False)
    assert groups_of(plan_cascade(tables, seq_lens, qsl, BS, 4, no_chunks)) == [([1, 2], 2)]


def test_rule_modes():
    assert cascade_rule("off", chunk_contexts=True) is None
    assert cascade_rule("auto", chunk_contexts=False).chunk_min_context is None
    with pytest.raises(ValueError, match="cascade_attention"):
        cascade_rule("sometimes", chunk_contexts=True)


# ----------------------------------------------------------------------------- plans drive attention


def random_batch(seed, mixed):
    """A batch with a random sharing structure: families of requests over common prefixes."""
    rng = np.random.default_rng(seed)
    seq_lens, shared, q_lens = [], [], []
    while len(seq_lens) < 9:
        prefix_blocks = int(rng.integers(1, 8))
        owner = len(seq_lens)
        for m in range(int(rng.integers(1, 4))):
            seq_lens.append(prefix_blocks * BS + int(rng.integers(1, 40)))
            shared.append(None if m == 0 else (owner, prefix_blocks))
            q_lens.append(1)
    if mixed:  # a prefill chunk of 7 tokens over a long context
        seq_lens.append(150)
        shared.append(None)
        q_lens.append(7)
    return seq_lens, shared, q_lens


def batch_tensors(seq_lens, shared, q_lens, num_heads, num_kv_heads, head_dim, seed):
    tables = tables_for(seq_lens, shared, seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = int(tables.max()) + 1
    k_cache = torch.randn(num_blocks, num_kv_heads, BS, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, num_kv_heads, BS, head_dim, generator=gen)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    return query, k_cache, v_cache, tables, qsl


def device_plan(plan, num_splits=None):
    return CascadeInputs(
        suffix_block_tables=torch.from_numpy(plan.suffix_block_tables), suffix_seq_lens=torch.from_numpy(
            plan.suffix_seq_lens), tiles=torch.from_numpy(plan.tiles), query_rows=torch.from_numpy(plan.query_rows),
        queries_per_tile=plan.queries_per_tile, max_suffix_len=plan.max_suffix_len,
        max_shared_len=plan.max_shared_len, num_splits=num_splits, prefixes=plan.prefixes,
        suffix_seq_lens_cpu=plan.suffix_seq_lens.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_cpu_cascade_decode_equals_paged_attention(seed):
    seq_lens, shared, q_lens = random_batch(seed, mixed=False)
    query, k_cache, v_cache, tables, qsl = batch_tensors(seq_lens, shared, q_lens, 6, 2, 32, seed)
    plan = plan_cascade(tables, np.array(seq_lens), qsl, BS, cascade_queries_per_tile(3), FORCE)
    assert plan is not None
    out = torch_backend.cascade_decode(query, k_cache, v_cache, device_plan(plan), torch.from_numpy(tables), 0.2)
    ref = reference.paged_attention(query, k_cache, v_cache, torch.from_numpy(qsl), torch.tensor(seq_lens),
                                    torch.from_numpy(tables), 0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixed", [False, True], ids=["decode", "mixed"])
def test_triton_cascade_follows_the_plan(mixed):
    """The layer's Triton path (kernels under the interpreter on CPU tensors) with a planned batch."""
    from nanovllm.layers.attention import triton_backend
    from nanovllm.layers.kernel_options import KernelOptions

    seed = 11 + mixed
    seq_lens, shared, q_lens = random_batch(seed, mixed)
    query, k_cache, v_cache, tables, qsl = batch_tensors(seq_lens, shared, q_lens, 4, 2, 32, seed)
    plan = plan_cascade(tables, np.array(seq_lens), qsl, BS, cascade_queries_per_tile(2), FORCE)
    assert plan is not None and (not mixed or any(len(p.rows) > 1 and len(p.seqs) == 1 for p in plan.prefixes))
    ctx = ForwardContext(
        positions=torch.zeros(len(query), dtype=torch.int64), slot_mapping=torch.zeros(len(query), dtype=torch.int64),
        query_start_loc=torch.from_numpy(qsl).int(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.from_numpy(tables), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        num_seqs=len(seq_lens), cascade=device_plan(plan, num_splits=3))
    out = triton_backend.cascade_attention(query, k_cache, v_cache, ctx, 0.2, KernelOptions(pdl=False))
    ref = reference.paged_attention(query, k_cache, v_cache, ctx.query_start_loc, ctx.seq_lens, ctx.block_tables, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
