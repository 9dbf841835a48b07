"""CUDA graphs for decode-only batches.

A decode step of a small model is hundreds of tiny kernels; launched one by one from
Python they cost more than they compute. We capture one graph per padded batch size
(1, 2, 4, 8, 16, then every 16 up to max_num_seqs) over static input buffers that each
step fills in place, all graphs sharing one memory pool, and replay the smallest graph
that fits. Padding rows read block 0 and write nowhere (slot -1).
"""

from __future__ import annotations

import logging

import torch

from nanovllm.kernels.launch_math import cdiv
from nanovllm.layers.forward_context import ForwardContext

logger = logging.getLogger(__name__)

SMALL_BATCH_SIZES = (1, 2, 4, 8)
BATCH_SIZE_STEP = 16
WARMUP_RUNS = 2


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


class CUDAGraphRunner:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int) -> None:
        self.runner = runner
        self.model = runner.model
        self.max_bs = max_num_seqs
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        device = runner.device
        max_blocks = cdiv(max_model_len, runner.block_size)
        n = self.max_bs
        # static inputs, filled in place before every replay
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(
            positions=self.positions[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # upper bound: the kernel reads real lengths from seq_lens
            num_seqs=bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        for bs in reversed(self.sizes):  # largest first so the pool is sized once
            ctx = self._context(bs)
            for _ in range(WARMUP_RUNS):
                self.model(self.input_ids[:bs], self.positions[:bs], ctx)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %s) using %.0f MiB", len(self.graphs), self.sizes,
                    (free_before - torch.cuda.mem_get_info()[0]) / 2**20)

    def can_run(self, inputs) -> bool:
        ctx = inputs.ctx
        return (ctx.max_query_len == 1 and ctx.num_seqs <= self.max_bs and ctx.max_seq_len <= self.max_model_len
                and inputs.input_ids.shape[0] == ctx.num_seqs)

    def run(self, inputs) -> torch.Tensor:
        ctx = inputs.ctx
        b = ctx.num_seqs
        bs = padded_batch_size(self.sizes, b)
        self.input_ids[:b].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:b].copy_(ctx.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(ctx.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(ctx.seq_lens, non_blocking=True)
        nb = ctx.block_tables.shape[1]
        self.block_tables[:b, :nb].copy_(ctx.block_tables, non_blocking=True)
        if bs > b:  # padding rows: write nowhere, attend to one harmless slot
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
