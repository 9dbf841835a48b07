"""The CPU path: paged attention and RoPE + KV store in plain torch, built for few ops.

Same contracts as `kernels.reference` (the simple truth this is tested against), but
decode rows of all sequences run as one batched matmul, prefill rows use
`scaled_dot_product_attention`, and everything that depends only on the batch (gather
indices, masks, RoPE cos/sin, cache slots) is computed once per step in `scratch` and
reused by every layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nanovllm.kernels import reference
from nanovllm.kernels.launch_math import cdiv


def rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                      scratch: Optional[dict] = None):
    """reference.rope_and_store_kv with cos/sin and cache slots computed once per step."""
    scratch = {} if scratch is None else scratch
    if "rope" not in scratch:
        cos, sin = reference.rope_cos_sin(positions, cos_sin_cache)  # [T, rot/2] each
        coords = reference.slot_coords(slot_mapping, k_cache.shape[2])
        scratch["rope"] = (cos.unsqueeze(1).float(), sin.unsqueeze(1).float(), coords)
    cos, sin, coords = scratch["rope"]
    q, k = reference.rotate_half(query, cos, sin), reference.rotate_half(key, cos, sin)
    reference.write_kv(k, value, k_cache, v_cache, *coords)
    return q, k


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    query_start_loc: list[int],  # host copy, [num_seqs + 1]
    seq_lens: list[int],  # host copy, [num_seqs]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    scale: float,
    sliding_window: Optional[int] = None,
    scratch: Optional[dict] = None,
) -> torch.Tensor:
    scratch = {} if scratch is None else scratch
    if "plan" not in scratch:
        q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        plan = {"q_lens": q_lens, "decode": decode}
        if decode:
            plan["rows"] = torch.tensor([query_start_loc[i] for i in decode])
            plan["mask"] = _decode_mask([seq_lens[i] for i in decode], k_cache.shape[2], sliding_window)
            plan["blocks"] = block_tables[decode][:, : plan["mask"].shape[-1] // k_cache.shape[2]].long()
        scratch["plan"] = plan
    plan = scratch["plan"]
    q_lens, decode = plan["q_lens"], plan["decode"]
    if len(decode) == len(q_lens):  # decode-only batch: no scatter needed
        return _decode(query, k_cache, v_cache, plan["blocks"], plan["mask"], scale)
    out = torch.empty_like(query)
    if decode:
        rows = plan["rows"]
        out[rows] = _decode(query[rows], k_cache, v_cache, plan["blocks"], plan["mask"], scale)
    for i, n in enumerate(q_lens):
        if n > 1:
            start = query_start_loc[i]
            out[start : start + n] = _prefill(query[start : start + n], k_cache, v_cache, seq_lens[i],
                                              block_tables[i], scale, sliding_window)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, nb] block ids -> [B, Hkv, nb * block_size, D]."""
    blocks = cache[block_tables[:, :num_blocks]]  # [B, nb, Hkv, bs, D]
    b, nb, h, bs, d = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(b, h, nb * bs, d)


def _decode_mask(seq_lens: list[int], block_size: int, sliding_window: Optional[int]) -> torch.Tensor:
    """[B, 1, 1, S] True where a key position must not be attended (S = block-padded max)."""
    nb = cdiv(max(seq_lens), block_size)
    lens = torch.tensor(seq_lens).view(-1, 1, 1, 1)
    pos = torch.arange(nb * block_size).view(1, 1, 1, -1)
    masked = pos >= lens
    if sliding_window is not None:
        masked |= pos <= lens - 1 - sliding_window
    return masked


def _decode(q, k_cache, v_cache, blocks, masked, scale):
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    k = _gather(k_cache, blocks, blocks.shape[1])  # [B, Hkv, S, D]
    v = _gather(v_cache, blocks, blocks.shape[1])
    qg = q.view(b, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(qg.float(), k.float().transpose(2, 3)) * scale  # [B, Hkv, G, S]
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).view(b, num_heads, head_dim).to(q.dtype)  # [B, H, D]


def _prefill(q, k_cache, v_cache, seq_len, block_table, scale, sliding_window):
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    nb = cdiv(seq_len, block_size)
    table = block_table.view(1, -1).long()
    k = _gather(k_cache, table, nb)[0, :, :seq_len]  # [Hkv, S, D]
    v = _gather(v_cache, table, nb)[0, :, :seq_len]
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
