"""The CPU path: paged attention and RoPE + KV store in plain torch, built for few ops.

Same contracts as `kernels.reference` (the simple truth this is tested against), but
decode rows of all sequences run as one `scaled_dot_product_attention` call, each prefill
as one more, q and k of a packed qkv projection are rotated together, and everything that
depends only on the batch (gather indices, masks, RoPE cos/sin, cache slots) is computed
once per step in `scratch` and reused by every layer.

Why so few ops: at batch-1 decode of a small model (SmolLM2-135M: 30 layers) each torch
call costs a few microseconds of dispatch next to a few microseconds of work, so the op
count per layer, not the arithmetic, sets the step time.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nanovllm.kernels import kv_quant, reference
from nanovllm.kernels.launch_math import cdiv


def rope_and_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                      scratch: Optional[dict] = None, kv_scale: Optional[torch.Tensor] = None):
    """reference.rope_and_store_kv with cos/sin and cache slots computed once per step (an fp8
    cache gets its values quantized with the layer's `kv_scale`, as the reference does)."""
    scratch = {} if scratch is None else scratch
    entry = f"rope/{cos_sin_cache.data_ptr()}"  # one per table (Gemma 3: local and global rope bases)
    if entry not in scratch:
        cos, sin = reference.rope_cos_sin(positions, cos_sin_cache)  # [T, rot/2] each
        coords = reference.slot_coords(slot_mapping, k_cache.shape[2])
        scratch[entry] = (cos.unsqueeze(1).float(), sin.unsqueeze(1).float(), coords)
    cos, sin, coords = scratch[entry]
    qk = _packed_qk(query, key)
    if qk is not None:  # one rotation for both (elementwise: the same values as two)
        q, k = _rotate(qk, cos, sin, scratch, entry).split([query.shape[1], key.shape[1]], dim=1)
    else:
        q, k = _rotate(query, cos, sin, scratch, entry), _rotate(key, cos, sin, scratch, entry)
    k_stored = k
    if kv_quant.is_fp8(k_cache) and kv_quant.rotates_keys(k.shape[-1], cos_sin_cache.shape[-1]):
        q, k_stored = reference.hadamard_rotate(q, k)
    _write_kv(k_stored, value, k_cache, v_cache, coords, kv_scale, scratch)
    return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scratch: dict, entry: str) -> torch.Tensor:
    """reference.rotate_half in four ops when the whole head rotates in fp32:
    x * [cos | cos] + roll(x, D/2) * [-sin | sin] = [x1 cos - x2 sin | x2 cos + x1 sin], the
    reference's products and sums (negation is exact), so the same bits."""
    half = cos.shape[-1]
    if x.dtype != torch.float32 or x.shape[-1] != 2 * half:
        return reference.rotate_half(x, cos, sin)
    full = scratch.get(entry + "/full")
    if full is None:  # [T, 1, D] each, once per step
        full = scratch[entry + "/full"] = (torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1))
    return x * full[0] + x.roll(half, dims=-1) * full[1]  # [T, heads, D]


def _packed_qk(query: torch.Tensor, key: torch.Tensor) -> Optional[torch.Tensor]:
    """[T, H + Hkv, D] view over q and k when k's heads follow q's in memory (the split of one
    qkv projection), else None."""
    t, h, d = query.shape
    if (key.shape[0] != t or key.shape[2] != d or key.dtype != query.dtype or query.stride()[1:] != (d, 1)
            or key.stride() != query.stride() or key.data_ptr() != query.data_ptr() + h * d * query.element_size()):
        return None
    return query.as_strided((t, h + key.shape[1], d), query.stride())


def _write_kv(key, value, k_cache, v_cache, coords, kv_scale, scratch: dict) -> None:
    """reference.write_kv, without its per-layer boolean gather when no token is padding."""
    valid, blocks, offsets = coords
    if "all_slots_valid" not in scratch:
        scratch["all_slots_valid"] = bool(valid.all())
    if scratch["all_slots_valid"] and not kv_quant.is_fp8(k_cache):
        k_cache[blocks, :, offsets] = key if key.dtype == k_cache.dtype else key.to(k_cache.dtype)  # [T, Hkv, D]
        v_cache[blocks, :, offsets] = value if value.dtype == v_cache.dtype else value.to(v_cache.dtype)
        return
    reference.write_kv(key, value, k_cache, v_cache, valid, blocks, offsets, kv_scale=kv_scale)


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
    kv_scale: Optional[torch.Tensor] = None,  # [4, num_kv_heads] fp32 when the cache is fp8
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
            plan["allowed"] = ~plan["mask"]
            plan["blocks"] = block_tables[decode][:, : plan["mask"].shape[-1] // k_cache.shape[2]].long().contiguous()
        scratch[plan_key] = plan
    plan = scratch[plan_key]
    q_lens, decode = plan["q_lens"], plan["decode"]
    if len(decode) == len(q_lens):  # decode-only batch: no scatter needed
        return _decode(query, k_cache, v_cache, plan["blocks"], plan["mask"], scale, softcap, kv_scale,
                       plan["allowed"])
    out = torch.empty_like(query)
    if decode:
        rows = plan["rows"]
        out[rows] = _decode(query[rows], k_cache, v_cache, plan["blocks"], plan["mask"], scale, softcap, kv_scale,
                            plan["allowed"])
    for i, n in enumerate(q_lens):
        if n > 1:
            start = query_start_loc[i]
            out[start : start + n] = _prefill(query[start : start + n], k_cache, v_cache, seq_lens[i],
                                              block_tables[i], scale, sliding_window, softcap, kv_scale)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[B, nb] block ids -> [B, Hkv, nb * block_size, D] (index_select: cheaper than indexing)."""
    b, nb = block_tables.shape[0], num_blocks
    _, h, bs, d = cache.shape
    index = block_tables.view(-1) if block_tables.shape[1] == nb and block_tables.is_contiguous() else \
        block_tables[:, :nb].reshape(-1)  # [B * nb]
    blocks = cache.index_select(0, index).view(b, nb, h, bs, d)
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


def _decode(q, k_cache, v_cache, blocks, masked, scale, softcap=None, kv_scale=None, allowed=None):
    b, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    # [B, Hkv, S, D] fp32 (an fp8 cache dequantized per KV head)
    k = kv_quant.maybe_dequantize(_gather(k_cache, blocks, blocks.shape[1]), kv_scale, kv_quant.K_SCALE, -3)
    v = kv_quant.maybe_dequantize(_gather(v_cache, blocks, blocks.shape[1]), kv_scale, kv_quant.V_SCALE, -3)
    qg = q.view(b, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]: a KV group's heads as its query rows
    if softcap is None and allowed is not None:  # one op for scores, mask, softmax and weighted sum
        same = qg.dtype == k.dtype == v.dtype  # fp32 cache and model: no casts (each is an op)
        out = F.scaled_dot_product_attention(qg if same else qg.to(k.dtype), k, v if same else v.to(k.dtype),
                                             attn_mask=allowed, scale=scale).reshape(b, num_heads, head_dim)
        return out if out.dtype == q.dtype else out.to(q.dtype)  # [B, H, D]
    scores = reference.soft_cap(torch.matmul(qg.float(), k.transpose(2, 3)) * scale, softcap)  # [B, Hkv, G, S]
    scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).view(b, num_heads, head_dim).to(q.dtype)  # [B, H, D]


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


def _prefill(q, k_cache, v_cache, seq_len, block_table, scale, sliding_window, softcap=None,
             kv_scale=None):
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    nb = cdiv(seq_len, block_size)
    table = block_table.view(1, -1).long()
    k = _gather(k_cache, table, nb)[0, :, :seq_len]  # [Hkv, S, D]
    v = _gather(v_cache, table, nb)[0, :, :seq_len]
    if kv_quant.is_fp8(k):  # SDPA runs in the query's dtype
        k = kv_quant.dequantize(k, kv_scale[kv_quant.K_SCALE], -3).to(q.dtype)
        v = kv_quant.dequantize(v, kv_scale[kv_quant.V_SCALE], -3).to(q.dtype)
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
