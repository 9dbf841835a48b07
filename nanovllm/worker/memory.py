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
    """K and V bytes of one block over all of the model's attention layers."""
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


@torch.inference_mode()
def profile_num_kv_blocks(model, cfg: EngineConfig, device: torch.device, dtype: torch.dtype, max_model_len: int,
                          bytes_per_block: int) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    used_before = total - free
    allocated_before = torch.cuda.memory_allocated(device)

    lens = profile_batch_lens(cfg.max_num_batched_tokens, cfg.max_num_seqs, max_model_len)
    num_tokens, seq_len, num_seqs = sum(lens), lens[0], len(lens)
    blocks_per_seq = cdiv(seq_len, cfg.block_size)
    num_blocks = num_seqs * blocks_per_seq
    attn_layers = model.attention_layers()
    saved = [(a.k_cache, a.v_cache) for a in attn_layers]
    for a in attn_layers:  # a temporary cache just big enough for the profiling batch
        shape = (num_blocks, a.num_kv_heads, cfg.block_size, a.cache_head_dim)
        a.k_cache = torch.empty(shape, dtype=dtype, device=device)
        a.v_cache = torch.empty(shape, dtype=dtype, device=device)
    temp_cache_bytes = num_blocks * bytes_per_block

    positions = np.concatenate([np.arange(n) for n in lens])
    slots = np.concatenate([i * blocks_per_seq * cfg.block_size + np.arange(n) for i, n in enumerate(lens)])
    block_tables = np.arange(num_blocks, dtype=np.int32).reshape(num_seqs, blocks_per_seq)
    ctx = ForwardContext(
        positions=torch.from_numpy(positions).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        query_start_loc=torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(block_tables).to(device),
        max_query_len=seq_len, max_seq_len=seq_len, num_seqs=num_seqs,
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model(input_ids, ctx.positions, ctx)
    # logits + sampling temporaries for a full decode batch
    rows = torch.arange(min(cfg.max_num_seqs, num_tokens), device=device)
    logits = model.compute_logits(hidden, rows).float()
    torch.softmax(logits, dim=-1).argmax(dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - allocated_before - temp_cache_bytes
    del hidden, logits
    for a, (k, v) in zip(attn_layers, saved):
        a.k_cache, a.v_cache = k, v
    torch.cuda.empty_cache()

    blocks = kv_cache_blocks(total, cfg.gpu_memory_utilization, used_before, peak, bytes_per_block)
    logger.info("KV cache: total %.1f GiB, in use %.1f GiB, activation peak %.2f GiB -> %d blocks (%.1f GiB)",
                total / 2**30, used_before / 2**30, peak / 2**30, blocks, blocks * bytes_per_block / 2**30)
    return blocks
