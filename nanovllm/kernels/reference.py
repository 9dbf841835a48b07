"""Pure-torch kernels: the truth every Triton kernel is tested against, and the CPU path.

KV cache layout (per layer): K and V are each `[num_blocks, num_kv_heads, block_size, head_dim]`.
A token at absolute position p of a sequence lives in block `block_table[p // block_size]`
at offset `p % block_size`; its flat slot is `block_id * block_size + offset`.

A batch is "varlen": the new tokens of all sequences are concatenated along dim 0.
`query_start_loc[i]:query_start_loc[i+1]` are sequence i's new tokens and `seq_lens[i]` is its
context length *after* this step (cached tokens + new ones), so the new tokens sit at
positions `seq_lens[i] - q_len_i ... seq_lens[i] - 1`. That one description covers
prefill, chunked prefill, prefill over a cached prefix and decode (q_len = 1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nanovllm.kernels.counter_rng import seeded_exponential

# ----------------------------------------------------------------------------- KV store


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip (padding)
) -> None:
    """Write each token's K and V into its cache slot."""
    write_kv(key, value, k_cache, v_cache, *slot_coords(slot_mapping, k_cache.shape[2]))


def slot_coords(slot_mapping: torch.Tensor, block_size: int):
    """(valid token mask, block ids, offsets in block) of the tokens with a slot (not -1)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    return valid, slots // block_size, slots % block_size


def write_kv(key, value, k_cache, v_cache, valid, blocks, offsets) -> None:
    # index_put with (block, :, offset) -> value [n, num_kv_heads, head_dim]
    k_cache[blocks, :, offsets] = key[valid].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value[valid].to(v_cache.dtype)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int
    seq_len: int,
) -> torch.Tensor:
    """Contiguous `[seq_len, num_kv_heads, head_dim]` view of one sequence's cached K or V."""
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, H, bs, D]
    return blocks.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:seq_len]


# ----------------------------------------------------------------------------- attention


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int, cumulative new-token counts
    seq_lens: torch.Tensor,  # [num_seqs] int, context length after this step
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int
    scale: float,
    sliding_window: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequence's paged K/V (already stored).

    Query token at absolute position p attends to keys at positions max(0, p - W + 1) .. p
    (W = sliding_window, or all of them when None). GQA: query head h reads KV head
    h // (num_heads // num_kv_heads). With `softcap` (Gemma 2) the scaled scores become
    `softcap * tanh(scores / softcap)` before the mask and softmax. Computed in fp32,
    returned in the query's dtype.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len).float()  # [S, Hkv, D]
        v = gather_kv(v_cache, block_tables[i], seq_len).float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[start:end].float().transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)  # [q_len]
        k_pos = torch.arange(seq_len, device=query.device)  # [S]
        allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, S]
        if sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
        scores = soft_cap(torch.matmul(q, k.transpose(1, 2)) * scale, softcap)  # [H, q_len, S]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)  # [q_len, H, D]
    return out


def soft_cap(scores: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """`softcap * tanh(scores / softcap)` (Gemma 2's attention and final-logit capping); None: unchanged."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # [num_tokens, num_heads] natural-log sum-exp of scores
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets (split-KV, cascade)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype), lse


def paged_attention_lse(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    seq_lens: torch.Tensor,  # [num_seqs]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    scale: float,
    sliding_window: Optional[int] = None,
) -> torch.Tensor:
    """[num_tokens, num_heads] fp32: natural-log sum-exp of each new token's scaled scores over
    the keys `paged_attention` lets it see (what the kernels write to `lse_out`)."""
    num_heads = query.shape[1]
    group = num_heads // k_cache.shape[1]
    lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len).float().repeat_interleave(group, dim=1)  # [S, H, D]
        scores = torch.einsum("qhd,shd->hqs", query[start:end].float(), k) * scale  # [H, q_len, S]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, S]
        if sliding_window is not None:
            allowed &= q_pos[:, None] - k_pos[None, :] < sliding_window
        lse[start:end] = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1).transpose(0, 1)
    return lse


def shared_prefix_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # [R] query rows (token indices) that all see the shared keys
    block_table: torch.Tensor,  # [max_blocks] the table whose first blocks hold the shared keys
    shared_len: int,  # keys 0 .. shared_len - 1 of that table
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the rows over one shared run of keys, no mask (cascade attention's prefix part).

    The shared K/V are gathered once for all rows. Returns (out [R, H, D] fp32, lse [R, H] fp32).
    """
    group = query.shape[1] // k_cache.shape[1]
    k = gather_kv(k_cache, block_table, shared_len).float().repeat_interleave(group, dim=1)  # [S, H, D]
    v = gather_kv(v_cache, block_table, shared_len).float().repeat_interleave(group, dim=1)
    scores = torch.einsum("rhd,shd->rhs", query[rows.long()].float(), k) * scale  # [R, H, S]
    lse = torch.logsumexp(scores, dim=-1)  # [R, H]
    out = torch.einsum("rhs,shd->rhd", torch.softmax(scores, dim=-1), v)  # [R, H, D]
    return out, lse


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] = cat(cos, sin) halves
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache[positions.long()]  # [num_tokens, rotary_dim]
    cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    return cos, sin


def apply_rope(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]
) -> torch.Tensor:
    """Rotate-half (NeoX / HF Llama) RoPE on the first rotary_dim features of each head."""
    cos, sin = rope_cos_sin(positions, cos_sin_cache)
    return rotate_half(x, cos.unsqueeze(1).float(), sin.unsqueeze(1).float())


def rotate_half(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, 1, rotary_dim / 2] fp32
    sin: torch.Tensor,
) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.numel() else rotated


def rope_and_store_kv(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,
    k_cache: Optional[torch.Tensor],
    v_cache: Optional[torch.Tensor],
    slot_mapping: Optional[torch.Tensor],
    q_norm_weight: Optional[torch.Tensor] = None,  # [head_dim]
    k_norm_weight: Optional[torch.Tensor] = None,  # [head_dim]
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k, then store rotated k and v into the cache. Returns (q, k) rotated.

    With `q_norm_weight` / `k_norm_weight` (Qwen3), q / k heads are first RMS-normalised
    over head_dim (`rms_norm`, then RoPE on its rounded output): the unfused composition
    that the Triton kernel does in one pass.
    """
    if q_norm_weight is not None:
        query = rms_norm(query, q_norm_weight, norm_eps)
    if k_norm_weight is not None:
        key = rms_norm(key, k_norm_weight, norm_eps)
    q = apply_rope(query, positions, cos_sin_cache)
    k = apply_rope(key, positions, cos_sin_cache)
    if k_cache is not None:  # None: rotate only, as the Triton twin
        store_kv(k, value, k_cache, v_cache, slot_mapping)
    return q, k


# ----------------------------------------------------------------------------- norms, activations


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32 (HF Llama order: normalise, cast, then scale)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual')."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] -> silu(x[..., :d]) * x[..., d:]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] -> gelu_tanh(x[..., :d]) * x[..., d:] (Gemma's GeGLU, `gelu_pytorch_tanh`)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, rounded once to x's dtype (HF
    Gemma order; the checkpoint stores weight - 1, so a zero weight is the identity scale)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def gemma_fused_add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual (rounded to x's dtype); returns (gemma_rms_norm(residual'), residual')."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return gemma_rms_norm(new_residual, weight, eps), new_residual


# ----------------------------------------------------------------------------- sampling


def fused_sample_reference(
    logits: torch.Tensor,  # [B, V] any float dtype
    temperature: torch.Tensor,  # [B] fp32, <= 0 = greedy row
    seed_words: torch.Tensor,  # [B, 2] int64 (low, high) 32-bit words of each row's seed
    steps: torch.Tensor,  # [B] int64
) -> torch.Tensor:
    """[B] int64: argmax of l on greedy rows, else the exponential race argmax_v p_v / E_v,
    written as argmax_v (l_v / T - log E_v) with E = `seeded_exponential(seed_words, steps, V)`."""
    x = logits.float()  # [B, V]
    sampled = temperature > 0  # [B]
    noise = seeded_exponential(seed_words, steps, x.shape[-1])  # [B, V] Exp(1)
    scores = x / torch.where(sampled, temperature, 1.0).unsqueeze(1) - noise.log()
    return torch.where(sampled.unsqueeze(1), scores, x).argmax(dim=-1)


# ----------------------------------------------------------------------------- skinny GEMM (GEMV)


def skinny_gemm_reference(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] (nn.Linear layout)
    bias: Optional[torch.Tensor] = None,  # [N]
) -> torch.Tensor:
    """[M, N] = x @ weight^T (+ bias) in fp32, rounded once to x's dtype (`gemv.skinny_gemm` numerics)."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def rms_norm_skinny_gemm_reference(
    x: torch.Tensor,  # [M, K]
    residual: Optional[torch.Tensor],  # [M, K] or None
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor] = None,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gemv.rms_norm_skinny_gemm` numerics: the new residual rounded to x's dtype, then in
    fp32 (h * g) @ W^T scaled by 1 / rms(h) (+ bias), rounded once."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)  # [M, 1]
    out = (hf * norm_weight.float()) @ weight.float().t() * rstd
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype), h


def silu_mul_skinny_gemm_reference(
    x: torch.Tensor,  # [M, 2K] = [gate | up]
    weight: torch.Tensor,  # [N, K]
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`gemv.silu_mul_skinny_gemm` numerics: `silu_and_mul` in x's dtype, then `skinny_gemm_reference`."""
    return skinny_gemm_reference(silu_and_mul(x), weight, bias)
