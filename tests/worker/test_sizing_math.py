"""The CPU-testable arithmetic of CUDA-graph batch padding and KV cache sizing.

The capture and profiling themselves need a GPU (tests/gpu); which batch sizes are
captured, which graph a batch replays, the profiling batch's shape and the block count
left by a memory budget are plain integers, checked here.
"""

from __future__ import annotations

import pytest

from nanovllm.worker.cuda_graphs import BATCH_SIZE_STEP, capture_sizes, padded_batch_size
from nanovllm.worker.memory import kv_cache_blocks, profile_batch_lens

GiB = 2**30


@pytest.mark.parametrize("max_num_seqs, expected", [
    (1, [1]),
    (3, [1, 2, 3]),
    (8, [1, 2, 4, 8]),
    (12, [1, 2, 4, 8, 12]),
    (16, [1, 2, 4, 8, 16]),
    (40, [1, 2, 4, 8, 16, 32, 40]),
    (64, [1, 2, 4, 8, 16, 32, 48, 64]),
])
def test_capture_sizes(max_num_seqs, expected):
    assert capture_sizes(max_num_seqs) == expected


@pytest.mark.parametrize("max_num_seqs", [1, 2, 5, 8, 9, 17, 100, 256, 512])
def test_every_batch_replays_the_smallest_graph_that_holds_it(max_num_seqs):
    sizes = capture_sizes(max_num_seqs)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
    for b in range(1, max_num_seqs + 1):
        padded = padded_batch_size(sizes, b)
        assert padded in sizes and padded >= b
        assert not any(b <= s < padded for s in sizes)  # no smaller graph would do
        assert padded - b < max(b, BATCH_SIZE_STEP)  # padding wastes less than the batch (or one step)
    with pytest.raises(ValueError, match=str(max_num_seqs + 1)):
        padded_batch_size(sizes, max_num_seqs + 1)


@pytest.mark.parametrize("tokens, seqs, model_len, expected", [
    (8192, 256, 4096, [4096, 4096]),  # the budget as full-length sequences
    (8192, 256, 3000, [3000, 3000, 2192]),  # the last one holds the rest
    (8192, 2, 1024, [1024, 1024]),  # capped by what max_num_seqs full sequences hold
    (100, 8, 4096, [100]),  # a budget shorter than one sequence
    (4096, 256, 4096, [4096]),
])
def test_profiling_batch_shape(tokens, seqs, model_len, expected):
    lens = profile_batch_lens(tokens, seqs, model_len)
    assert lens == expected
    assert sum(lens) == min(tokens, seqs * model_len) and max(lens) <= model_len


def test_kv_blocks_fill_the_budget_left_after_weights_and_activations():
    per_block = 3 * 2**20  # 3 MiB
    # 80 GiB * 0.9 = 72 GiB, minus 10 GiB in use and 2 GiB of activations: 60 GiB = 20480 blocks
    assert kv_cache_blocks(80 * GiB, 0.9, 10 * GiB, 2 * GiB, per_block) == 20480
    # a partial block does not count
    assert kv_cache_blocks(80 * GiB, 0.9, 10 * GiB, 2 * GiB + 1, per_block) == 20479
    assert kv_cache_blocks(80 * GiB, 0.5, 10 * GiB, 2 * GiB, per_block) == (28 * GiB) // per_block
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_blocks(80 * GiB, 0.1, 10 * GiB, 2 * GiB, per_block)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache_blocks(10 * GiB, 1.0, 10 * GiB - per_block // 2, 0, per_block)  # half a block left


def test_cpu_kv_cache_holds_max_num_seqs_full_requests_up_to_64k_tokens(tiny_model_factory):
    from nanovllm import LLM
    from nanovllm.config import DEFAULT_CPU_KV_CACHE_TOKENS

    path = tiny_model_factory("qwen3")
    small = LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=128, max_num_seqs=3)
    assert small.engine.stats()["num_blocks"] == 3 * 128 // 16
    big = LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=512, max_num_seqs=256, block_size=32)
    assert big.engine.stats()["num_blocks"] == DEFAULT_CPU_KV_CACHE_TOKENS // 32
