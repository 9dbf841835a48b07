"""What a "cascade" CUDA graph reads at replay: the plan's suffix tables and lengths, not the full ones.

The graphs are captured over views of static buffers (cuda_graphs.CUDAGraphRunner._context);
`run` fills them from the step's plan and replays. On the CPU a stand-in graph records, at
replay time, the tensors its captured context points at, for a batch shaped like
`bench prefix` (a): 64 decodes sharing 2,048 cached tokens (128 blocks) + their own blocks.
"""

import types

import numpy as np
import pytest
import torch

from nanovllm.kernels import paged_attention as pa
from nanovllm.kernels.cascade_attention import choose_cascade_splits
from nanovllm.kernels.launch_math import cascade_queries_per_tile, cdiv
from nanovllm.layers.attention.cascade import cascade_rule, plan_cascade
from nanovllm.layers.forward_context import CascadeInputs, ForwardContext
from nanovllm.worker import cuda_graphs as cg

BLOCK = 16
PREFIX, OWN = 2048, 64
KV_HEADS, GROUP = 8, 2  # Qwen3-0.6B: 16 query heads over 8 KV heads
MAX_SEQS = 64
MAX_LEN = PREFIX + OWN + 128 + 16  # bench prefix (a)'s max_model_len


class RecordingGraph:
    """Stands in for torch.cuda.CUDAGraph: copies what the captured context points at when replayed."""

    def __init__(self, ctx: ForwardContext) -> None:
        self.ctx, self.seen = ctx, None

    def replay(self) -> None:
        c = self.ctx.cascade
        self.seen = {"suffix_tables": c.suffix_block_tables.clone(), "suffix_lens": c.suffix_seq_lens.clone(),
                     "tiles": c.tiles.clone(), "rows": c.query_rows.clone(), "tables": self.ctx.block_tables.clone(),
                     "seq_lens": self.ctx.seq_lens.clone(), "num_splits": c.num_splits,
                     "max_suffix_len": c.max_suffix_len}


def shared_batch(n: int, step: int):
    """n decodes: 128 shared blocks, then their own; context PREFIX + OWN + step + 1."""
    width = cdiv(MAX_LEN, BLOCK)
    shared = np.arange(1, PREFIX // BLOCK + 1)
    tables = np.stack([np.r_[shared, 1000 + 100 * i + np.arange(width - len(shared))] for i in range(n)])
    return tables.astype(np.int32), np.full(n, PREFIX + OWN + step + 1, np.int32), np.arange(n + 1, dtype=np.int32)


def graph_runner():
    spec = cg.CascadeGraphSpec(cascade_queries_per_tile(GROUP), cascade_rule("auto", True).max_groups, KV_HEADS)
    runner = types.SimpleNamespace(model=None, device=torch.device("cpu"), block_size=BLOCK, num_kv_heads=KV_HEADS,
                                   num_sms=132, options=types.SimpleNamespace(balanced_decode=False))
    g = cg.CUDAGraphRunner(runner, MAX_SEQS, MAX_LEN, cascade=spec)
    for shape in g.shapes.values():  # as capture() sizes them
        expected = cdiv(shape.batch, spec.queries_per_tile)
        g.splits[shape] = choose_cascade_splits(expected, KV_HEADS, MAX_LEN, runner.device)
    for shape in g.shapes.values():
        g.graphs[shape] = RecordingGraph(g._context(shape))
        g.outputs[shape] = torch.zeros(shape.num_tokens, 4)
    return g, spec


def step_inputs(g, spec, tables, seq_lens, qsl):
    n = len(seq_lens)
    cap = g.plan_capacity(n, n, 1)
    plan = plan_cascade(tables, seq_lens, qsl, BLOCK, spec.queries_per_tile, cascade_rule("auto", True),
                        max_tiles=cap, pad_tiles=True)
    arrays = [torch.from_numpy(a) for a in (plan.suffix_block_tables, plan.suffix_seq_lens, plan.tiles,
                                            plan.query_rows)]
    cascade = CascadeInputs(*arrays, spec.queries_per_tile, plan.max_suffix_len, plan.max_shared_len)
    ctx = ForwardContext(torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), torch.from_numpy(qsl),
                         torch.from_numpy(seq_lens), torch.from_numpy(tables), 1, int(seq_lens.max()), n,
                         cascade=cascade)
    return plan, types.SimpleNamespace(input_ids=torch.zeros(n, dtype=torch.int64), ctx=ctx)


@pytest.mark.parametrize("n", [64, 50])
def test_cascade_replay_reads_the_suffix_tables_and_lengths(n):
    g, spec = graph_runner()
    for step in (0, 7):  # a second replay reads the new plan, not the first one's
        tables, seq_lens, qsl = shared_batch(n, step)
        plan, inputs = step_inputs(g, spec, tables, seq_lens, qsl)
        # bench (a)'s plan: one group of every row, all 128 shared blocks, in cdiv(n, 32) tiles
        assert [(len(p.seqs), p.shared_len) for p in plan.prefixes] == [(n, PREFIX)]
        assert plan.num_live_tiles == cdiv(n, spec.queries_per_tile)
        assert g.can_run(inputs)
        g.run(inputs)
        shape = g.shapes[("cascade", cg.padded_batch_size(g.sizes, n))]
        seen = g.graphs[shape].seen
        assert seen is not None and g.num_replays["cascade"] == 1 + (step > 0) and g.num_replays["decode"] == 0
        own = OWN + step + 1
        assert seen["suffix_lens"][:n].tolist() == [own] * n  # not the full PREFIX + own keys
        assert seen["suffix_lens"][n:].tolist() == [1] * (shape.num_seqs - n)  # padding rows: one key
        w = plan.suffix_block_tables.shape[1]
        assert torch.equal(seen["suffix_tables"][:n, :w], torch.from_numpy(plan.suffix_block_tables))
        assert seen["suffix_tables"][:n, 0].tolist() == [1000 + 100 * i for i in range(n)]  # each one's own block
        assert torch.equal(seen["tiles"], torch.from_numpy(plan.tiles))
        assert torch.equal(seen["rows"], torch.from_numpy(plan.query_rows))
        assert seen["seq_lens"][:n].tolist() == seq_lens.tolist()  # the full lengths stay for non-cascade layers
        # the base (suffix) kernel's split count comes from the capture bound: one split at this batch
        assert pa.choose_num_splits(shape.num_seqs, KV_HEADS, seen["max_suffix_len"], torch.device("cpu")) == 1
