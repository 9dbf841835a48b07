"""Mixture-of-experts in pure torch: the reference (the truth `fused_moe.py` is tested against)
and the vectorised grouped path the CPU runs.

Both compute, for each token t with experts e_j and routing weights w_j (j < top_k):

    out[t] = sum_j w_j * down_e(silu(gate_e(x_t)) * up_e(x_t))

with `w13[e] = [gate rows; up rows]` ([2I, H]) and `w2[e]` ([H, I]). Numerics follow the
Triton kernel: fp32 products, the gate_up output and the activation rounded to x's dtype,
each pair's down output rounded after its weight multiply, the top_k sum in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe_reference(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] fp32
    topk_ids: torch.Tensor,  # [T, top_k] int
    act_and_mul=_silu_mul,
) -> torch.Tensor:
    """The truth, one expert at a time (a loop over experts: reference only, never the hot path)."""
    num_tokens, top_k = topk_ids.shape
    dtype = hidden.dtype
    pair_out = torch.zeros(num_tokens, top_k, hidden.shape[1], dtype=dtype, device=hidden.device)  # [T, k, H]
    for expert in range(w13.shape[0]):
        tokens, slots = torch.where(topk_ids == expert)
        if tokens.numel() == 0:
            continue
        gate_up = (hidden[tokens].float() @ w13[expert].float().t()).to(dtype)  # [n, 2I]
        act = act_and_mul(gate_up)  # [n, I]
        down = act.float() @ w2[expert].float().t() * topk_weights[tokens, slots, None].float()  # [n, H]
        pair_out[tokens, slots] = down.to(dtype)
    return pair_out.sum(dim=1, dtype=torch.float32).to(dtype)  # [T, H]


def fused_moe_torch(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] fp32
    topk_ids: torch.Tensor,  # [T, top_k] int
    act_and_mul=_silu_mul,
) -> torch.Tensor:
    """The same, vectorised: no Python loop over tokens or experts.

    Few pairs (decode: T * top_k below E): each pair gathers its expert's weights and one
    batched matmul runs them all (reads only the chosen experts). Many pairs: the pairs are
    sorted by expert into an [E, capacity, H] batch (capacity = the busiest expert's count,
    padded with zeros) and each projection is one batched matmul over the experts.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    dtype = hidden.dtype
    flat = topk_ids.reshape(-1).long()  # [P]
    num_pairs = flat.numel()
    if num_pairs == 0:
        return torch.zeros_like(hidden)
    pair_tokens = torch.arange(num_pairs, device=hidden.device) // top_k  # [P]
    if num_pairs < num_experts:
        gate_up = torch.einsum("ph,pnh->pn", hidden[pair_tokens], w13[flat])  # [P, 2I]
        down = torch.einsum("pi,phi->ph", act_and_mul(gate_up), w2[flat])  # [P, H]
    else:
        order = torch.argsort(flat, stable=True)  # [P] pairs grouped by expert
        sorted_experts = flat[order]
        counts = torch.zeros(num_experts, dtype=torch.long, device=hidden.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        rank = torch.arange(num_pairs, device=hidden.device) - (counts.cumsum(0) - counts)[sorted_experts]
        capacity = int(counts.max())  # a host read: CPU path only
        batch = hidden.new_zeros(num_experts, capacity, hidden.shape[1])  # [E, C, H]
        batch[sorted_experts, rank] = hidden[pair_tokens[order]]
        gate_up = torch.bmm(batch, w13.transpose(1, 2))  # [E, C, 2I]
        out = torch.bmm(act_and_mul(gate_up), w2.transpose(1, 2))  # [E, C, H]
        down = torch.empty(num_pairs, hidden.shape[1], dtype=dtype, device=hidden.device)
        down[order] = out[sorted_experts, rank]  # [P, H] back in pair order
    down = (down.float() * topk_weights.reshape(-1, 1).float()).to(dtype)  # [P, H]
    return down.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(dtype)  # [T, H]
