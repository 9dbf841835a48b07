"""CUDA graphs for decode steps, for decode steps with shared prefixes, and for short mixed steps.

A decode step of a small model is hundreds of tiny kernels; launched one by one from
Python they cost more than they compute. We capture graphs over static input buffers that
each step fills in place, all graphs sharing one memory pool, and replay the smallest
graph that fits. Three families (`GraphShape.kind`):

- "decode": one padded batch size each (1, 2, 4, 8, 16, then every 16 up to
  max_num_seqs). Padding rows read one slot of a block they do not own and write nowhere
  (slot -1).
- "cascade": the same sizes (>= 2) with a cascade plan (layers/attention/cascade.py): the
  suffix block tables, the tile table and the query rows are static buffers too, the tile
  table padded with empty tiles up to the graph's capacity, and the shared-prefix kernel's
  split count is fixed at capture (each tile's split length follows its own prefix).
- "mixed", only with `max_prefill_tokens_while_decoding` = P: up to bs + 1 sequences and
  bs + P tokens, i.e. the decodes of a batch plus the prompt chunk the scheduler allows
  next to them. The unified attention kernel finds each sequence in the padded batch on
  the device; padding sequences have no new tokens, padding tokens store no K/V (slot -1)
  and their rows are never sampled. With cascade attention on, these graphs always run the
  cascade path (a step without a plan gets its full tables as the suffix and no tiles), so
  a chunk's long cached context is split over the GPU inside the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from nanovllm.kernels.launch_math import cdiv
from nanovllm.layers.forward_context import CascadeInputs, ForwardContext

logger = logging.getLogger(__name__)

SMALL_BATCH_SIZES = (1, 2, 4, 8)
BATCH_SIZE_STEP = 16
WARMUP_RUNS = 2
MIXED_EXTRA_TILES = 2  # tile slack of a mixed graph's capacity beyond its tokens' tiles and the decode groups


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, ascending: 1, 2, 4, 8 below max_num_seqs, every 16th, and max_num_seqs."""
    sizes = [s for s in SMALL_BATCH_SIZES if s < max_num_seqs]
    sizes += list(range(BATCH_SIZE_STEP, max_num_seqs + 1, BATCH_SIZE_STEP))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


def padded_batch_size(sizes: list[int], num_seqs: int) -> int:
    """The captured batch size a decode batch of num_seqs rows replays: the smallest that holds it."""
    for size in sizes:  # ascending
        if size >= num_seqs:
            return size
    raise ValueError(f"no CUDA graph holds {num_seqs} sequences (largest captured: {sizes[-1]})")


@dataclass(frozen=True)
class GraphShape:
    kind: str  # "decode" | "cascade" | "mixed"
    batch: int  # the capture size it is built from
    num_seqs: int  # padded sequences
    num_tokens: int  # padded tokens


@dataclass(frozen=True)
class CascadeGraphSpec:
    """What the cascade buffers of the graphs are sized by (the model runner's plan settings)."""

    queries_per_tile: int
    max_groups: int  # decode groups per plan (CascadeRule.max_groups)
    num_kv_heads: int


def cascade_capacity(shape: GraphShape, spec: CascadeGraphSpec) -> int:
    """Tiles a graph's plan may use: every decode group's tiles (groups of >= 2 of the batch:
    at most cdiv(batch, qpt) + max_groups - 1) and, for mixed graphs, every token in chunk tiles."""
    qpt = spec.queries_per_tile
    tiles = cdiv(shape.batch, qpt) + spec.max_groups - 1
    if shape.kind == "mixed":
        tiles += cdiv(shape.num_tokens, qpt) + MIXED_EXTRA_TILES
    return max(1, tiles)


class CUDAGraphRunner:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, prefill_tokens: int = 0,
                 cascade: Optional[CascadeGraphSpec] = None) -> None:
        self.runner = runner
        self.model = runner.model
        self.max_bs = max_num_seqs
        self.max_model_len = max_model_len
        self.prefill_tokens = prefill_tokens
        self.cascade = cascade
        self.sizes = capture_sizes(max_num_seqs)
        shapes = [GraphShape("decode", bs, bs, bs) for bs in self.sizes]
        if cascade is not None:
            shapes += [GraphShape("cascade", bs, bs, bs) for bs in self.sizes if bs >= 2]
        if prefill_tokens:
            shapes += [GraphShape("mixed", bs, bs + 1, bs + prefill_tokens) for bs in self.sizes]
        self.shapes = {(s.kind, s.batch): s for s in shapes}
        device = runner.device
        n_tok = max_num_seqs + prefill_tokens
        n_seq = max_num_seqs + (1 if prefill_tokens else 0)
        max_blocks = cdiv(max(max_model_len, n_tok), runner.block_size)  # a mixed capture's one sequence: n_tok
        # static inputs, filled in place before every replay
        self.input_ids = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n_tok, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n_tok,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n_seq, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n_seq, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n_seq + 1, dtype=torch.int32, device=device)
        self.splits: dict[GraphShape, int] = {}
        if cascade is not None:
            max_tiles = max(cascade_capacity(s, cascade) for s in shapes if s.kind != "decode")
            self.suffix_block_tables = torch.zeros(n_seq, max_blocks, dtype=torch.int32, device=device)
            self.suffix_seq_lens = torch.ones(n_seq, dtype=torch.int32, device=device)
            self.tiles = torch.zeros(max_tiles, 3, dtype=torch.int32, device=device)
            self.query_rows = torch.full((max_tiles * cascade.queries_per_tile,), -1, dtype=torch.int32, device=device)
        self.graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphShape, torch.Tensor] = {}
        self.pool = None
        self.num_replays = {kind: 0 for kind in ("decode", "cascade", "mixed")}  # benchmarks, tests

    # ------------------------------------------------------------------ shapes
    def _uses_cascade(self, shape: GraphShape) -> bool:
        return self.cascade is not None and shape.kind != "decode"

    def _select(self, num_seqs: int, num_tokens: int, max_query_len: int, has_plan: bool) -> Optional[GraphShape]:
        """The graph a step replays, or None (eager)."""
        if max_query_len == 1 and num_tokens == num_seqs:
            if num_seqs > self.max_bs:
                return None
            return self.shapes.get(("cascade" if has_plan else "decode", padded_batch_size(self.sizes, num_seqs)))
        if self.prefill_tokens:
            for bs in self.sizes:  # ascending: the smallest mixed graph that holds the step
                if bs + 1 >= num_seqs and bs + self.prefill_tokens >= num_tokens:
                    return self.shapes[("mixed", bs)]
        return None

    def plan_capacity(self, num_seqs: int, num_tokens: int, max_query_len: int) -> Optional[int]:
        """Tile capacity for a step's cascade plan: the replayed graph's (0: that graph has no
        cascade path, plan nothing), or None when the step runs eagerly (any number of tiles)."""
        shape = self._select(num_seqs, num_tokens, max_query_len, has_plan=True)
        if shape is None:
            if max_query_len == 1 and num_tokens == num_seqs and num_seqs <= self.max_bs:
                return 0  # a decode graph without a cascade variant (batch 1)
            return None
        return cascade_capacity(shape, self.cascade) if self._uses_cascade(shape) else 0

    def _context(self, shape: GraphShape) -> ForwardContext:
        s, t = shape.num_seqs, shape.num_tokens
        cascade = None
        if self._uses_cascade(shape):
            cap = cascade_capacity(shape, self.cascade)
            cascade = CascadeInputs(
                suffix_block_tables=self.suffix_block_tables[:s], suffix_seq_lens=self.suffix_seq_lens[:s],
                tiles=self.tiles[:cap], query_rows=self.query_rows[: cap * self.cascade.queries_per_tile],
                queries_per_tile=self.cascade.queries_per_tile, max_suffix_len=self.max_model_len,
                max_shared_len=self.max_model_len, num_splits=self.splits[shape],
            )
        return ForwardContext(
            positions=self.positions[:t],
            slot_mapping=self.slot_mapping[:t],
            query_start_loc=self.query_start_loc[: s + 1],
            seq_lens=self.seq_lens[:s],
            block_tables=self.block_tables[:s],
            max_query_len=1 if shape.kind != "mixed" else t,  # > 1: the unified kernel
            max_seq_len=self.max_model_len,  # upper bound: the kernels read real lengths from seq_lens
            num_seqs=s,
            cascade=cascade,
        )

    # ------------------------------------------------------------------ capture
    def _capture_inputs(self, shape: GraphShape) -> None:
        """Static contents the warm-up runs compute on: padding everywhere (a mixed graph's one
        sequence holds all its tokens, over block 0; no K/V is stored), no tiles."""
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self.query_start_loc.copy_(torch.arange(len(self.query_start_loc), dtype=torch.int32))
        if shape.kind == "mixed":
            self.query_start_loc[1:].fill_(shape.num_tokens)
            self.seq_lens[0] = shape.num_tokens
        if self.cascade is not None:
            self.suffix_seq_lens.copy_(self.seq_lens)
            self.tiles.zero_()
            self.query_rows.fill_(-1)

    @torch.inference_mode()
    def capture(self) -> None:
        if self.cascade is not None:
            from nanovllm.kernels.cascade_attention import choose_cascade_splits

            qpt = self.cascade.queries_per_tile
            for shape in self.shapes.values():  # sized for the typical plan: one group of the whole batch, or one chunk
                expected = cdiv(shape.batch if shape.kind == "cascade" else self.prefill_tokens, qpt)
                self.splits[shape] = choose_cascade_splits(expected, self.cascade.num_kv_heads, self.max_model_len,
                                                           self.runner.device)
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        for shape in sorted(self.shapes.values(), key=lambda s: (-s.num_tokens, s.kind)):  # largest first: one pool
            self._capture_inputs(shape)
            ctx = self._context(shape)
            ids, pos = self.input_ids[: shape.num_tokens], self.positions[: shape.num_tokens]
            for _ in range(WARMUP_RUNS):
                self.model(ids, pos, ctx)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(ids, pos, ctx)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[shape] = graph
            self.outputs[shape] = out
        self._capture_inputs(GraphShape("decode", 1, 1, 1))
        torch.cuda.synchronize()
        kinds = sorted({s.kind for s in self.shapes.values()})
        logger.info("captured %d CUDA graphs (%s; batch sizes %s) using %.0f MiB", len(self.graphs), ", ".join(kinds),
                    self.sizes, (free_before - torch.cuda.mem_get_info()[0]) / 2**20)

    # ------------------------------------------------------------------ replay
    def can_run(self, inputs) -> bool:
        ctx = inputs.ctx
        return (ctx.max_seq_len <= self.max_model_len and self._select(
            ctx.num_seqs, inputs.input_ids.shape[0], ctx.max_query_len, ctx.cascade is not None) is not None)

    def run(self, inputs) -> torch.Tensor:
        ctx = inputs.ctx
        b, t = ctx.num_seqs, inputs.input_ids.shape[0]
        shape = self._select(b, t, ctx.max_query_len, ctx.cascade is not None)
        s, t_pad = shape.num_seqs, shape.num_tokens
        self.input_ids[:t].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:t].copy_(ctx.positions, non_blocking=True)
        self.slot_mapping[:t].copy_(ctx.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(ctx.seq_lens, non_blocking=True)
        nb = ctx.block_tables.shape[1]
        self.block_tables[:b, :nb].copy_(ctx.block_tables, non_blocking=True)
        if t < t_pad:  # padding tokens store nothing
            self.slot_mapping[t:t_pad].fill_(-1)
        if shape.kind == "mixed":
            self.query_start_loc[: b + 1].copy_(ctx.query_start_loc, non_blocking=True)
            if b < s:  # padding sequences: no new tokens
                self.query_start_loc[b + 1 : s + 1].fill_(t)
        elif b < s:  # padding decode rows attend to one harmless slot
            self.seq_lens[b:s].fill_(1)
        if self._uses_cascade(shape):
            self._fill_cascade(shape, ctx, b, s, nb)
        self.graphs[shape].replay()
        self.num_replays[shape.kind] += 1
        return self.outputs[shape][:t]

    def _fill_cascade(self, shape: GraphShape, ctx: ForwardContext, b: int, s: int, nb: int) -> None:
        cap = cascade_capacity(shape, self.cascade)
        rows = cap * self.cascade.queries_per_tile
        plan = ctx.cascade
        if plan is not None:  # the planner padded its tiles to this graph's capacity
            w = plan.suffix_block_tables.shape[1]
            self.suffix_block_tables[:b, :w].copy_(plan.suffix_block_tables, non_blocking=True)
            self.suffix_seq_lens[:b].copy_(plan.suffix_seq_lens, non_blocking=True)
            self.tiles[:cap].copy_(plan.tiles, non_blocking=True)
            self.query_rows[:rows].copy_(plan.query_rows, non_blocking=True)
        else:  # a mixed step without shared prefixes: every suffix is the whole table
            self.suffix_block_tables[:b, :nb].copy_(ctx.block_tables, non_blocking=True)
            self.suffix_seq_lens[:b].copy_(ctx.seq_lens, non_blocking=True)
            self.tiles[:cap].zero_()
            self.query_rows[:rows].fill_(-1)
        if shape.kind == "cascade" and b < s:
            self.suffix_seq_lens[b:s].fill_(1)
