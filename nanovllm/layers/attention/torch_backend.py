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
    entry = f"rope/{cos_sin_cache.data_ptr()}"  # one per table (Gemma 3: local and global rope bases)
    if entry not in scratch:
        cos, sin = reference.rope_cos_sin(positions, cos_sin_cache)  # [T, rot/2] each
        coords = reference.slot_coords(slot_mapping, k_cache.shape[2])
        scratch[entry] = (cos.unsqueeze(1).float(), sin.unsqueeze(1).float(), coords)
    cos, sin, coords = scratch[entry]
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
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """The batch's decode rows in one batched matmul, each prefill through SDPA (or, soft-capped,
    an explicit softmax); `scratch` keeps what depends only on the batch and the layer's window."""
    scratch = {} if scratch is None else scratch
    plan_key = "plan" if sliding_window is None else f"plan/{sliding_window}"  # layers of two windows: two plans
    if plan_key not in scratch:
        q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
        decode = [i for i, n in enumerate(q_lens) if n == 1]
        plan = {"q_lens": q_lens, "decode": decode}
        if decode:
            plan["rows"] = torch.tensor([query_start_loc[i] for i in decode])
            plan["mask"] = _decode_mask([seq_lens[i] for i in decode], k_cache.shape[2], sliding_window)
            plan["blocks"] = block_tables[decode][:, : plan["mask"].shape[-1] // k_cache.shape[2]].long()
        scratch[plan_key] = plan
    plan = scratch[plan_key]
    q_lens, decode = plan["q_lens"], plan["decode"]
    if len(decode) == len(q_lens):  # decode-only batch: no scatter needed
        return _decode(query, k_cache, v_cache, plan["blocks"], plan["mask"], scale, softcap)
    out = torch.empty_like(query)
    if decode:
        rows = plan["rows"]
        out[rows] = _decode(query[rows], k_cache, v_cache, plan["blocks"], plan["mask"], scale, softcap)
    for i, n in enumerate(q_lens):
        if n > 1:
            start = query_start_loc[i]
            out[start : start + n] = _prefill(query[start : start + n], k_cache, v_cache, seq_lens[i],
                                              block_tables[i], scale, sliding_window, softcap)
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


def _decode(q, k_cache, v_cache, blocks, masked, scale, softcap=None):
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    k = _gather(k_cache, blocks, blocks.shape[1])  # [B, Hkv, S, D]
    v = _gather(v_cache, blocks, blocks.shape[1])
    qg = q.view(b, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    scores = reference.soft_cap(torch.matmul(qg.float(), k.float().transpose(2, 3)) * scale, softcap)  # [B, Hkv, G, S]
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).view(b, num_heads, head_dim).to(q.dtype)  # [B, H, D]


def cascade_decode(
    query: torch.Tensor,  # [B, H, D], one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,
    cascade,  # forward_context.CascadeInputs with host prefixes and suffix lengths
    block_tables: torch.Tensor,  # [B, max_blocks], the full tables (shared blocks first)
    scale: float,
    scratch: Optional[dict] = None,
) -> torch.Tensor:
    """Decode attention with shared prefixes (the CPU twin of kernels/cascade_attention.py for
    decode groups): each prefix's K/V is gathered once for all its rows, each sequence's own
    blocks go through the batched decode, and the two are merged by log-sum-exp."""
    scratch = {} if scratch is None else scratch
    if "cascade" not in scratch:
        block_size = k_cache.shape[2]
        mask = _decode_mask(cascade.suffix_seq_lens_cpu, block_size, None)
        blocks = cascade.suffix_block_tables[:, : mask.shape[-1] // block_size].long()
        shared = [(torch.from_numpy(p.rows).long(), block_tables[p.table_row, : p.shared_len // block_size].long())
                  for p in cascade.prefixes]
        scratch["cascade"] = (mask, blocks, shared)
    mask, blocks, shared = scratch["cascade"]
    out, lse = _decode_with_lse(query, k_cache, v_cache, blocks, mask, scale)
    for rows, table in shared:
        o, l = _shared_prefix(query[rows], k_cache, v_cache, table, scale)
        out[rows], _ = reference.merge_attention_states(out[rows], lse[rows], o, l)
    return out


def _decode_with_lse(q, k_cache, v_cache, blocks, masked, scale):
    """`_decode` that also returns each row's log-sum-exp: ([B, H, D] in q's dtype, [B, H] fp32)."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    k = _gather(k_cache, blocks, blocks.shape[1])  # [B, Hkv, S, D]
    v = _gather(v_cache, blocks, blocks.shape[1])
    qg = q.view(b, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(qg.float(), k.float().transpose(2, 3)) * scale  # [B, Hkv, G, S]
    scores.masked_fill_(masked, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())  # [B, Hkv, G, D]
    return out.view(b, num_heads, head_dim).to(q.dtype), lse.view(b, num_heads)


def _shared_prefix(q, k_cache, v_cache, table, scale):
    """Rows [R, H, D] over the shared blocks `table` [nb], no mask: ([R, H, D] fp32, [R, H] fp32)."""
    r, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    k = _gather(k_cache, table.view(1, -1), table.shape[0])[0].float()  # [Hkv, S, D], gathered once
    v = _gather(v_cache, table.view(1, -1), table.shape[0])[0].float()
    qg = q.float().view(r, num_kv_heads, group, head_dim).transpose(0, 1).reshape(num_kv_heads, r * group, head_dim)
    scores = torch.matmul(qg, k.transpose(1, 2)) * scale  # [Hkv, R * G, S]
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, R * G]
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v)  # [Hkv, R * G, D]
    out = out.view(num_kv_heads, r, group, head_dim).transpose(0, 1).reshape(r, num_heads, head_dim)
    return out, lse.view(num_kv_heads, r, group).transpose(0, 1).reshape(r, num_heads)


def _prefill(q, k_cache, v_cache, seq_len, block_table, scale, sliding_window, softcap=None):
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
    if q_len == seq_len and sliding_window is None and softcap is None:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
    else:
        q_pos = torch.arange(seq_len - q_len, seq_len).view(-1, 1)
        k_pos = torch.arange(seq_len).view(1, -1)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        if softcap is None:
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=allowed, scale=scale)
        else:  # SDPA has no soft-cap: scores, cap, mask, softmax by hand (fp32)
            scores = reference.soft_cap(torch.matmul(qh.float(), k.float().transpose(1, 2)) * scale, softcap)
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # [H, q_len, S]
            o = torch.matmul(probs, v.float()).to(q.dtype)
    return o.transpose(0, 1)  # [q_len, H, D]
