"""Paged attention in plain torch for the CPU path: batched decode, SDPA for prefills.

Same contract as `kernels.reference.paged_attention` (which stays the simple truth this is
tested against), but decode rows of all sequences run as one batched matmul and prefill
rows use `scaled_dot_product_attention`, so a CPU step is a few large ops instead of many
small ones per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    query_start_loc: list[int],  # host copy, [num_seqs + 1]
    seq_lens: list[int],  # host copy, [num_seqs]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    scale: float,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    out = torch.empty_like(query)
    q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        rows = torch.tensor([query_start_loc[i] for i in decode])
        out[rows] = _decode(query[rows], k_cache, v_cache, [seq_lens[i] for i in decode],
                            block_tables[decode], scale, sliding_window)
    for i, n in enumerate(q_lens):
        if n > 1:
            start = query_start_loc[i]
            out[start : start + n] = _prefill(query[start : start + n], k_cache, v_cache, seq_lens[i],
                                              block_tables[i], scale, sliding_window)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, nb] block ids -> [B, Hkv, nb * block_size, D]."""
    blocks = cache[block_tables[:, :num_blocks].long()]  # [B, nb, Hkv, bs, D]
    b, nb, h, bs, d = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(b, h, nb * bs, d)


def _decode(q, k_cache, v_cache, seq_lens, block_tables, scale, sliding_window):
    b, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = max(seq_lens)
    nb = -(-max_len // block_size)
    k = _gather(k_cache, block_tables, nb)  # [B, Hkv, S, D]
    v = _gather(v_cache, block_tables, nb)
    qg = q.view(b, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(qg.float(), k.float().transpose(2, 3)) * scale  # [B, Hkv, G, S]
    lens = torch.tensor(seq_lens).view(b, 1, 1, 1)
    pos = torch.arange(k.shape[2]).view(1, 1, 1, -1)
    masked = pos >= lens
    if sliding_window is not None:
        masked |= pos <= lens - 1 - sliding_window
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).view(b, num_heads, head_dim).to(q.dtype)  # [B, H, D]


def _prefill(q, k_cache, v_cache, seq_len, block_table, scale, sliding_window):
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    nb = -(-seq_len // block_size)
    k = _gather(k_cache, block_table.view(1, -1), nb)[0, :, :seq_len]  # [Hkv, S, D]
    v = _gather(v_cache, block_table.view(1, -1), nb)[0, :, :seq_len]
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=0)  # [H, S, D]
    v = v.repeat_interleave(group, dim=0)
    qh = q.transpose(0, 1)  # [H, q_len, D]
    if q_len == seq_len and sliding_window is None:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len).view(-1, 1)
        k_pos = torch.arange(seq_len).view(1, -1)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=allowed, scale=scale)
    return o.transpose(0, 1)  # [q_len, H, D]
