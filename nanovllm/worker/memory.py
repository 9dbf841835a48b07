"""Size the KV cache: from the GPU memory left after a profiling forward, or in tokens on CPU.

GPU budget = total * gpu_memory_utilization
             - memory in use before profiling (weights, CUDA context, other processes)
             - peak activation memory of the largest batch (forward + logits + sampling)
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from nanovllm.config import DEFAULT_CPU_KV_CACHE_TOKENS, EngineConfig
from nanovllm.kernels.launch_math import cdiv
from nanovllm.layers.forward_context import ForwardContext

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB of KV cache on CPU unless num_kv_blocks is given


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block over all of the model's attention layers, in the cache's dtype
    (fp8: one byte per value, so the same memory holds twice the bf16 tokens)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(2 * a.num_kv_heads * a.cache_head_dim for a in model.attention_layers()) * block_size * itemsize


def cpu_num_kv_blocks(cfg: EngineConfig, max_model_len: int, bytes_per_block: int) -> int:
    want_tokens = min(DEFAULT_CPU_KV_CACHE_TOKENS, cfg.max_num_seqs * max_model_len)
    return max(1, min(want_tokens // cfg.block_size, CPU_KV_CACHE_BYTES // bytes_per_block))


def profile_batch_lens(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Sequence lengths of the profiling prefill: max_num_batched_tokens tokens (at most what
    max_num_seqs full-length sequences hold) as sequences of at most max_model_len."""
    num_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
    seq_len = min(max_model_len, num_tokens)
    num_seqs = cdiv(num_tokens, seq_len)
    return [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]


def kv_cache_blocks(total: int, gpu_memory_utilization: float, used_before: int, activation_peak: int,
                    bytes_per_block: int) -> int:
    """Blocks that fit in total * gpu_memory_utilization - used_before - activation_peak bytes.

    Raises ValueError, saying what to change, when not even one block fits.
    """
    budget = total * gpu_memory_utilization - used_before - activation_peak
    blocks = int(budget // bytes_per_block)
    if blocks <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache (weights and activations use "
            f"{(used_before + activation_peak) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB): raise "
            f"gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return blocks


def prefill_context(lens: list[int], block_size: int, device: torch.device) -> tuple[ForwardContext, int]:
    """(ForwardContext, number of blocks) of a batch of whole prompts of the given lengths, each in
    its own run of consecutive blocks from block 0 (a scratch cache of that many blocks holds it)."""
    seq_len, num_seqs = max(lens), len(lens)
    blocks_per_seq = cdiv(seq_len, block_size)
    num_blocks = num_seqs * blocks_per_seq
    positions = np.concatenate([np.arange(n) for n in lens])
    slots = np.concatenate([i * blocks_per_seq * block_size + np.arange(n) for i, n in enumerate(lens)])
    block_tables = np.arange(num_blocks, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
    query_start_loc = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    on_cpu = device.type == "cpu"
    ctx = ForwardContext(
        positions=torch.from_numpy(positions).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        query_start_loc=torch.from_numpy(query_start_loc).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(block_tables).to(device),
        max_query_len=seq_len, max_seq_len=seq_len, num_seqs=num_seqs,
        query_start_loc_cpu=query_start_loc.tolist() if on_cpu else None,
        seq_lens_cpu=list(lens) if on_cpu else None,
    )
    return ctx, num_blocks


def scratch_caches(model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> list:
    """Swap each attention layer's cache for a zeroed one of num_blocks blocks; returns what to
    give back to `restore_caches` (the layers' own caches and scales)."""
    layers = model.attention_layers()
    saved = [(a.k_cache, a.v_cache, a.kv_scale) for a in layers]
    for a in layers:
        shape = (num_blocks, a.num_kv_heads, block_size, a.cache_head_dim)
        a.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        a.v_cache = torch.zeros(shape, dtype=dtype, device=device)
    return saved


def restore_caches(model, saved: list) -> None:
    for a, (k, v, scale) in zip(model.attention_layers(), saved):
        a.k_cache, a.v_cache, a.kv_scale = k, v, scale


@torch.inference_mode()
def profile_num_kv_blocks(model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype, max_model_len: int,
                          bytes_per_block: int) -> int:
    """KV blocks that fit next to the weights and the activation peak; `dtype` is the cache's."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    used_before = total - free
    allocated_before = torch.cuda.memory_allocated(device)

    lens = profile_batch_lens(cfg.max_num_batched_tokens, cfg.max_num_seqs, max_model_len)
    num_tokens = sum(lens)
    ctx, num_blocks = prefill_context(lens, cfg.block_size, device)
    # a temporary cache just big enough for the profiling batch (the layers keep their kv_scale)
    saved = scratch_caches(model, num_blocks, cfg.block_size, dtype, device)
    for a, (_, _, scale) in zip(model.attention_layers(), saved):
        a.kv_scale = scale
    temp_cache_bytes = num_blocks * bytes_per_block

    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(input_ids, ctx.positions, ctx)
    # logits + sampling temporaries for a full decode batch
    rows = torch.arange(min(cfg.max_num_seqs, num_tokens), device=device)
    logits = model.compute_logits(hidden, rows)  # None on tensor-parallel ranks > 0 (rank 0 samples)
    if logits is not None:
        torch.softmax(logits.float(), dim=-1).argmax(dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - allocated_before - temp_cache_bytes
    del hidden, logits
    restore_caches(model, saved)
    torch.cuda.empty_cache()

    blocks = kv_cache_blocks(total, cfg.gpu_memory_utilization, used_before, peak, bytes_per_block)
    logger.info("KV cache: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB -> %d blocks (%.1f GiB)",
                total / 2**30, used_before / 2**30, peak / 2**30, blocks, blocks * bytes_per_block / 2**30)
    return blocks
