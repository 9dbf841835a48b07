"""Triton fused mixture-of-experts: the experts of a sparse MoE layer as two grouped GEMMs.

Why. Each token goes to top_k of E experts. A loop over experts is E small GEMMs and E
launches per projection (and a host sync to find who goes where); per token it is worse.
Here the (token, expert) pairs are sorted by expert and each expert's run is padded to a
multiple of BLOCK_M (`moe_align`), so every BLOCK_M rows of the sorted list belong to one
expert; one launch per projection then covers all experts: program (m block, n tile) loads
its rows' activations by index, the expert's weight tile, and runs a tensor-core GEMM.

    gate_up:  C1[p] = x[token(p)] @ w13[e(p)]^T        [P, 2I]   (P = T * top_k pairs)
    act:      A[p]  = silu(C1[p, :I]) * C1[p, I:]      [P, I]    (kernels/activation.py)
    down:     C2[p] = w(p) * (A[p] @ w2[e(p)]^T)       [P, H]    routing weight folded in
    out[t]    = sum over its top_k pairs of C2          [T, H]

Nothing syncs with the host: the sort, counts and offsets stay on the device and the grid
is an upper bound on the padded blocks (`max_padded_blocks`); blocks past the real padded
length exit at once. So a CUDA graph captured at one batch size is right for any routing.

Numerics (`moe_reference.fused_moe_reference`): fp32 accumulation, C1 and A rounded to the
activation dtype, C2 rounded after the routing-weight multiply, the top_k sum in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanovllm.kernels.launch_math import cdiv

# Tile configs by the average rows per expert (P / E): decode-sized batches use thin M tiles
# (weight streaming), prefill-sized ones wider tiles (weight reuse across rows).
SMALL_BATCH_ROWS_PER_EXPERT = 16
CONFIG_SMALL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
CONFIG_MEDIUM = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
CONFIG_LARGE = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
MEDIUM_ROWS_PER_EXPERT = 64


def moe_config(num_pairs: int, num_experts: int) -> dict:
    rows = num_pairs / max(1, num_experts)
    if rows <= SMALL_BATCH_ROWS_PER_EXPERT:
        return CONFIG_SMALL
    return CONFIG_MEDIUM if rows <= MEDIUM_ROWS_PER_EXPERT else CONFIG_LARGE


def max_padded_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the BLOCK_M blocks after padding every expert's run: each non-empty
    run (at most min(E, P) of them) adds less than one block of padding."""
    return cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the (token, slot) pairs by expert, each expert's run padded to a multiple of block_m.

    Returns (sorted_pair_ids [max_blocks * block_m] int32: pair index t * top_k + j, P for
    padding; block_expert [max_blocks] int32: the expert of each block, num_experts past the
    end; num_padded [1] int32: rows in use). Device-side only: no host sync.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)  # [P]
    num_pairs = flat.numel()
    device = flat.device
    max_blocks = max_padded_blocks(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E] (bincount would sync for its size)
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)  # [E]
    order = torch.argsort(flat, stable=True)  # [P] pairs grouped by expert
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]  # [P] within run
    dest = (padded_end - padded)[sorted_experts] + rank  # [P] row in the padded list
    sorted_pair_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)  # E past the end
    num_padded = padded_end[-1:].to(torch.int32)
    return sorted_pair_ids, block_expert, num_padded


@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gemm_kernel(
    a_ptr,  # [T, K] (A_PER_PAIR False: row = pair // TOP_K) or [P, K] (A_PER_PAIR: row = pair)
    b_ptr,  # [E, N, K] expert weights (nn.Linear layout per expert)
    c_ptr,  # [P, N]
    weights_ptr,  # [P] fp32 routing weights, read when MUL_WEIGHT
    sorted_pair_ids_ptr,  # [max_blocks * BLOCK_M]
    block_expert_ptr,  # [max_blocks]
    num_padded_ptr,  # [1]
    num_pairs,
    N, K,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    TOP_K: tl.constexpr,
    A_PER_PAIR: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # spare block of the grid's upper bound
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)  # [BLOCK_M]
    row_ok = pairs < num_pairs  # padding rows compute garbage-free zeros and store nothing
    if A_PER_PAIR:
        a_rows = pairs
    else:
        a_rows = pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pair_ids, block_expert, num_padded,
                 top_k: int, a_per_pair: bool, config: dict, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[p] = a[row(p)] @ w[expert(p)]^T (* weights[p]) for every pair p: one launch."""
    num_pairs, n = out.shape
    k = a.shape[1]
    if w.shape[2] != k or w.shape[1] != n:
        raise ValueError(f"expert weights {tuple(w.shape)} do not map [*, {k}] to [*, {n}]")
    max_blocks = block_expert.shape[0]
    grid = (max_blocks, cdiv(n, config["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, w, out, weights if weights is not None else out, sorted_pair_ids, block_expert, num_padded,
        num_pairs, n, k,
        a.stride(0), a.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        TOP_K=top_k, A_PER_PAIR=a_per_pair, MUL_WEIGHT=weights is not None,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"],
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out


def fused_moe(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: gate rows then up rows of each expert
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] fp32 routing weights
    topk_ids: torch.Tensor,  # [T, top_k] int expert ids
    act_and_mul=None,  # [P, 2I] -> [P, I]; default silu(gate) * up (the Triton activation kernel)
) -> torch.Tensor:
    """The MoE layer's experts: `moe_reference.fused_moe_reference` semantics, two grouped GEMMs."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if w13.shape[2] != hidden_size or w2.shape != (num_experts, hidden_size, two_i // 2):
        raise ValueError(f"expert weights w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit hidden {hidden_size}")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError("topk_weights and topk_ids must both be [num_tokens, top_k]")
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    if act_and_mul is None:
        from nanovllm.kernels.activation import silu_and_mul as act_and_mul
    num_pairs = num_tokens * top_k
    config = moe_config(num_pairs, num_experts)
    sorted_pair_ids, block_expert, num_padded = moe_align(topk_ids, num_experts, config["BLOCK_M"])
    gate_up = hidden.new_empty(num_pairs, two_i)  # [P, 2I]
    grouped_gemm(hidden, w13, gate_up, sorted_pair_ids, block_expert, num_padded, top_k, False, config)
    act = act_and_mul(gate_up)  # [P, I]
    down = hidden.new_empty(num_pairs, hidden_size)  # [P, H]
    grouped_gemm(act, w2, down, sorted_pair_ids, block_expert, num_padded, top_k, True, config,
                 weights=topk_weights.reshape(-1).float())
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(hidden.dtype)  # [T, H]
