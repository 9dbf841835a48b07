"""KV cache manager: a pool of fixed-size blocks with refcounts and a prefix cache (torch-free).

- Each request owns a list of block ids (its block table); token at position p lives in
  `blocks[p // block_size]`.
- A block that is full and computed is registered under a chain hash of its tokens
  (hash of the previous block's hash + this block's token ids). A later request whose
  prompt starts with the same tokens reuses those blocks (refcount + 1) instead of
  recomputing them.
- Blocks whose refcount drops to 0 go to the free queue but keep their hash: they stay
  reusable until the allocator evicts them (least recently freed first).
- n > 1 completions fork: children share the parent's full blocks and get a private
  copy of the partially filled last block (copy-on-write done at fork time).
- Sliding window (`sliding_window`, set when every attention layer of the model has one):
  a request's blocks that lie wholly before the window of its next token can never be read
  again, so `free_out_of_window` returns them to the pool during generation, and a long
  generation holds about window / block_size + 2 blocks instead of a growing table. Freed
  blocks always form a prefix of the request's table (`num_window_freed`); their entries stay
  in the table (positions keep their meaning) but are dead: the attention kernels mask every
  key before the window, so whatever those blocks hold later is never weighed. They are
  registered in the prefix cache before they go (they are valid prefix blocks) and never
  after: a dead entry may name a block that now holds another request's tokens.
  A model with some global (full-attention) layers (Gemma) keeps every block: those layers
  read the whole context.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from nanovllm.engine.request import Request

# Seed of the hash chain: the "previous hash" of a request's first block.
ROOT_BLOCK_HASH = 0x9E3779B97F4A7C15


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens (the ceiling of the division)."""
    return -(-num_tokens // block_size)


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chain hash of one full block: identical prefixes give identical hash sequences."""
    return hash((parent_hash, token_ids))


def window_blocks_needed(sliding_window: int, max_new_tokens: int, block_size: int) -> int:
    """Most blocks a request holds at once when everything before its window is freed: the
    window before its first new token plus the new tokens (a step's chunk), and one block
    that the span may straddle."""
    return blocks_needed(sliding_window - 1 + max_new_tokens, block_size) + 1


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: Optional[int] = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window ({sliding_window}) must be positive or None")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.num_window_freed: dict[str, int] = {}  # request id -> leading table entries freed (dead)
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Optional[int]] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # free blocks, least recently freed first; insertion order = eviction order
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.req_blocks: dict[str, list[int]] = {}
        # prefix-cache statistics (tokens), for metrics
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache / prompt tokens looked up (0 before any lookup)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_of(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def _update_block_hashes(self, req: Request, num_tokens: int) -> None:
        """Extend req.block_hashes to cover every full block among its first num_tokens."""
        bs = self.block_size
        hashes = req.block_hashes
        parent = hashes[-1] if hashes else ROOT_BLOCK_HASH
        for i in range(len(hashes), num_tokens // bs):
            parent = hash_block(parent, tuple(req.token_ids_slice(i * bs, (i + 1) * bs)))
            hashes.append(parent)

    def find_cached_prefix(self, req: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks matching the start of req's tokens.

        At least one token is always left to compute (its logits are needed to sample).
        Returns (block ids, number of tokens they hold). Does not take references.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_cached_tokens = req.num_tokens - 1
        self._update_block_hashes(req, max_cached_tokens)
        blocks: list[int] = []
        for h in req.block_hashes[: max_cached_tokens // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_query_tokens
        self.prefix_hits += num_hit_tokens

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, req: Request, num_new_tokens: int, cached_blocks: tuple[int, ...] = ()) -> bool:
        have = len(self.req_blocks.get(req.request_id, ())) + len(cached_blocks)
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - have
        # cached blocks sitting in the free queue stop being free once we take them
        reclaimed = sum(1 for b in cached_blocks if self.ref_cnt[b] == 0)
        return need <= self.num_free_blocks - reclaimed

    def allocate_slots(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for num_new_tokens more tokens of req (after its computed ones).

        `cached_blocks` (from find_cached_prefix, only on first admission) are taken by
        reference. Returns False, changing nothing, when the pool is too small right now.
        """
        blocks = self.req_blocks.get(req.request_id)
        if blocks is not None and not cached_blocks:
            need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(blocks)  # blocks_needed
            if need <= 0:  # the common decode step: the last block still has room
                return True
            if need > len(self.free_queue):
                return False
            for _ in range(need):
                blocks.append(self._pop_free())
            return True
        if not self.can_allocate(req, num_new_tokens, tuple(cached_blocks)):
            return False
        blocks = self.req_blocks.setdefault(req.request_id, [])
        for b in cached_blocks:
            self._take(b)
            blocks.append(b)
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(blocks)
        for _ in range(need):
            blocks.append(self._pop_free())
        return True

    def _take(self, block: int) -> None:
        if self.ref_cnt[block] == 0:
            del self.free_queue[block]
        self.ref_cnt[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict: its content is about to be overwritten
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None
        self.ref_cnt[block] = 1
        return block

    def cache_computed_blocks(self, req: Request) -> None:
        """Register req's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching or req.num_computed_tokens // self.block_size <= req.num_registered_blocks:
            return  # no block filled up since the last call (most decode steps): nothing to register
        blocks = self.req_blocks.get(req.request_id)
        if not blocks:
            return
        # Async scheduling counts a launched step's tokens as computed before their values are
        # known: a block is hashed only once every token in it is known.
        num_full = min(min(req.num_computed_tokens, req.num_known_tokens) // self.block_size, len(blocks))
        self._register_blocks(req, blocks, num_full)

    def _register_blocks(self, req: Request, blocks: list[int], num_full: int) -> None:
        if num_full <= req.num_registered_blocks:
            return  # no block filled up since the last call (most decode steps)
        self._update_block_hashes(req, num_full * self.block_size)
        dead = self.num_window_freed.get(req.request_id, 0)
        for i in range(max(req.num_registered_blocks, dead), num_full):  # a dead entry may be another's block now
            b = blocks[i]
            if self.block_hash[b] is not None:
                continue
            h = req.block_hashes[i]
            if h in self.cached:  # same content already cached in another block: keep that one
                continue
            self.block_hash[b] = h
            self.cached[h] = b
        req.num_registered_blocks = num_full

    def free_out_of_window(self, req: Request) -> int:
        """Free req's blocks that lie wholly before the sliding window of its next token
        (position `num_computed_tokens`); returns how many. Full ones whose tokens are known
        are registered in the prefix cache first. Safe with a step in flight: anything that
        reuses a block runs in a later step, after that one on the device."""
        if self.sliding_window is None:
            return 0
        blocks = self.req_blocks.get(req.request_id)
        if not blocks:
            return 0
        first_needed = req.num_computed_tokens - self.sliding_window + 1  # oldest key the next token reads
        dead = min(max(0, first_needed) // self.block_size, len(blocks))
        freed = self.num_window_freed.get(req.request_id, 0)
        if dead <= freed:
            return 0
        if self.enable_prefix_caching:
            self._register_blocks(req, blocks, min(dead, req.num_known_tokens // self.block_size))
        for b in blocks[freed:dead]:
            self._release(b)
        self.num_window_freed[req.request_id] = dead
        return dead - freed

    def live_blocks_of(self, request_id: str) -> list[int]:
        """The blocks req still holds (its table without the entries freed out of the window)."""
        return self.req_blocks.get(request_id, [])[self.num_window_freed.get(request_id, 0):]

    def _release(self, block: int) -> None:
        self.ref_cnt[block] -= 1
        if self.ref_cnt[block] == 0:
            self.free_queue[block] = None
        elif self.ref_cnt[block] < 0:  # internal invariant, never user input
            raise RuntimeError(f"block {block} freed more times than it was taken")

    def free(self, req: Request) -> None:
        """Drop req's references. Last blocks are queued first so they are evicted first."""
        blocks = self.req_blocks.pop(req.request_id, None)
        dead = self.num_window_freed.pop(req.request_id, 0)
        req.num_registered_blocks = 0
        if not blocks:
            return
        for b in reversed(blocks[dead:]):
            self._release(b)

    # ------------------------------------------------------------------ n > 1
    def fork(self, parent: Request, child: Request) -> Optional[tuple[int, int]]:
        """Give child the parent's blocks: full ones shared, the partial last one copied.

        Returns the (src, dst) block copy the runner must do before the next forward,
        or None. The caller checks `num_free_blocks` first (one block per child at most).
        """
        parent_blocks = self.req_blocks.get(parent.request_id, [])
        num_full = parent.num_computed_tokens // self.block_size
        dead = min(self.num_window_freed.get(parent.request_id, 0), num_full)
        child_blocks = list(parent_blocks[:dead])  # dead entries: positions only, no reference
        if dead:
            self.num_window_freed[child.request_id] = dead
        for b in parent_blocks[dead:num_full]:
            self._take(b)
            child_blocks.append(b)
        copy = None
        if parent.num_computed_tokens % self.block_size:
            dst = self._pop_free()
            copy = (parent_blocks[num_full], dst)
            child_blocks.append(dst)
        self.req_blocks[child.request_id] = child_blocks
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = min(parent.num_registered_blocks, num_full)
        return copy
