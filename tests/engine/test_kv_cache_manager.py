"""KV cache manager: refcounts, prefix cache hits, LRU eviction, fork, no leaks (plain Python)."""

import pytest

from nanovllm.engine.kv_cache_manager import KVCacheManager
from nanovllm.engine.request import Request
from nanovllm.sampling_params import SamplingParams

BS = 4


def make_req(rid, tokens, max_tokens=8):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), max_tokens)


def admit(kv, req, num_new=None):
    blocks, cached = kv.find_cached_prefix(req)
    req.num_computed_tokens = cached
    n = req.num_tokens - cached if num_new is None else num_new
    assert kv.allocate_slots(req, n, blocks)
    return cached


def compute_all(kv, req):
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)


def test_allocate_counts_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    req = make_req("a", range(10))  # 10 tokens -> 3 blocks
    admit(kv, req)
    assert len(kv.blocks_of("a")) == 3
    assert kv.num_free_blocks == 7
    kv.free(req)
    assert kv.num_free_blocks == 10
    assert kv.usage == 0.0


def test_allocation_fails_without_side_effects_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    req = make_req("a", range(12))  # needs 3 blocks
    assert not kv.allocate_slots(req, 12)
    assert kv.num_free_blocks == 2
    assert kv.blocks_of("a") == []


def test_prefix_cache_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_req("a", range(9))  # 2 full blocks + 1 token
    admit(kv, a)
    compute_all(kv, a)
    b = make_req("b", list(range(8)) + [99, 100])
    cached = admit(kv, b)
    assert cached == 8
    assert kv.blocks_of("b")[:2] == kv.blocks_of("a")[:2]
    assert kv.ref_cnt[kv.blocks_of("a")[0]] == 2
    # an exact repeat of a block-aligned prompt must still compute its last token
    c = make_req("c", range(8))
    assert admit(kv, c) == 4
    for r in (a, b, c):
        kv.free(r)
    assert kv.num_free_blocks == 10


def test_freed_cached_blocks_are_reused_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_req("a", range(9))
    admit(kv, a)
    compute_all(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    b = make_req("b", list(range(8)) + [7])
    assert admit(kv, b) == 8  # hit on blocks that were free but not evicted
    kv.free(b)
    # a request that needs every block evicts the cached ones
    c = make_req("c", range(100, 116))
    assert admit(kv, c) == 0
    assert kv.cached == {}
    kv.free(c)
    d = make_req("d", list(range(8)) + [1])
    assert admit(kv, d) == 0


def test_eviction_order_is_least_recently_freed_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_req("a", range(12))
    admit(kv, a)
    compute_all(kv, a)
    blocks = list(kv.blocks_of("a"))
    kv.free(a)
    # free queue order: untouched blocks first, then a's blocks tail first
    assert list(kv.free_queue)[-3:] == blocks[::-1]


def test_disabled_prefix_cache_never_hits():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a = make_req("a", range(9))
    admit(kv, a)
    compute_all(kv, a)
    b = make_req("b", range(9))
    assert admit(kv, b) == 0


def test_fork_shares_full_blocks_and_copies_partial():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    parent = make_req("p", range(7))
    admit(kv, parent, num_new=6)
    parent.num_computed_tokens = 6  # 1 full block + 2 tokens in the second
    child = make_req("p#1", range(7))
    child.num_computed_tokens = 6
    copy = kv.fork(parent, child)
    pb, cb = kv.blocks_of("p"), kv.blocks_of("p#1")
    assert cb[0] == pb[0] and kv.ref_cnt[pb[0]] == 2
    assert copy == (pb[1], cb[1]) and cb[1] != pb[1]
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 10


def test_double_free_is_harmless_and_refcounts_never_negative():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_req("a", range(5))
    admit(kv, a)
    kv.free(a)
    kv.free(a)
    assert kv.num_free_blocks == 3
    assert min(kv.ref_cnt) == 0


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=BS)


def test_a_block_is_only_reused_at_the_position_it_was_computed_at():
    """The hash chains each block to its prefix: equal tokens at another position are no hit.

    A block's K/V depend on its position (RoPE) and on every token before it, so a block
    of tokens X cached at block 0 must not serve X at block 1, nor after another prefix.
    """
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    x, y = [5, 6, 7, 8], [9, 10, 11, 12]
    a = make_req("a", x + x + [1])  # X at blocks 0 and 1
    admit(kv, a)
    compute_all(kv, a)
    first, second = kv.blocks_of("a")[:2]
    assert first != second
    again = make_req("again", x + x + [2])  # the same two blocks: both hit, in order
    assert admit(kv, again) == 2 * BS
    assert kv.blocks_of("again")[:2] == [first, second]
    shifted = make_req("shifted", y + x + [3])  # X after another prefix: no hit at all
    assert admit(kv, shifted) == 0
    assert first not in kv.blocks_of("shifted") and second not in kv.blocks_of("shifted")
    b = make_req("b", y + x + [4])
    compute_all(kv, shifted)
    moved = make_req("moved", x + [4])  # X at block 0 hits a's first block, never shifted's second
    assert admit(kv, moved) == BS and kv.blocks_of("moved")[0] == first
    assert admit(kv, b) == 2 * BS and kv.blocks_of("b")[:2] == kv.blocks_of("shifted")[:2]
    for r in (a, again, shifted, moved, b):
        kv.free(r)
    assert kv.num_free_blocks == kv.num_blocks
