"""Triton fused MoE (`kernels/fused_moe.py`) and the vectorised CPU path vs the per-expert reference.

CPU: the interpreter in fp32 on small shapes (skewed and sparse routings, dims that are not
tile multiples). GPU (`@pytest.mark.gpu`): bf16, incl. a Qwen3-30B-A3B-shaped layer (hidden
2048, 128 experts, top-8, moe_intermediate 768) at 1 to 4096 tokens, and a CUDA graph
captured once and replayed with other routings (the kernel path never syncs).
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels.fused_moe import fused_moe, max_padded_blocks, moe_align
from nanovllm.kernels.moe_reference import fused_moe_reference, fused_moe_torch
from nanovllm.layers.moe import route

from kernel_params import DEVICE, GPU, HAS_CUDA

FP32_ATOL = 1e-4
BF16_REL = 2e-2
QWEN3_30B_A3B = dict(hidden=2048, experts=128, top_k=8, inter=768)


def make_layer(tokens, experts, top_k, hidden, inter, dtype, device, seed=0, skew=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    logits = torch.randn(tokens, experts, generator=g)
    if skew is not None:  # most tokens prefer the same few experts
        logits[:, :skew] += 4.0
    weights, ids = route(logits, top_k, renormalize=True)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to), weights.to(**to),
            ids.to(**to))


def assert_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype and not out.isnan().any()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=FP32_ATOL)
    else:
        err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < BF16_REL, f"relative error {err:.3e}"


SMALL = {  # (tokens, experts, top_k, hidden, intermediate)
    "decode": (1, 8, 2, 32, 48),
    "batch": (7, 8, 2, 48, 40),  # N and K not multiples of the tiles
    "more-pairs-than-experts": (37, 4, 2, 64, 32),
    "sparse": (3, 16, 4, 32, 16),  # most experts get nobody
}


@pytest.mark.parametrize("case", list(SMALL))
@pytest.mark.parametrize("skew", [None, 2], ids=["spread", "skewed"])
def test_fused_moe_matches_reference(case, skew):
    x, w13, w2, weights, ids = make_layer(*SMALL[case], torch.float32, DEVICE, seed=len(case), skew=skew)
    ref = fused_moe_reference(x, w13, w2, weights, ids)
    assert_close(fused_moe(x, w13, w2, weights, ids), ref)


@pytest.mark.parametrize("case", list(SMALL))
def test_vectorised_cpu_path_matches_reference(case):
    """Both branches: gathered expert weights (fewer pairs than experts) and the padded expert batch."""
    x, w13, w2, weights, ids = make_layer(*SMALL[case], torch.float32, "cpu", seed=7)
    assert_close(fused_moe_torch(x, w13, w2, weights, ids), fused_moe_reference(x, w13, w2, weights, ids))


def test_moe_align_groups_every_pair_once():
    ids = torch.tensor([[3, 1], [1, 0], [3, 1], [2, 3], [1, 3]])
    block_m, experts = 4, 5
    sorted_ids, block_expert, num_padded = moe_align(ids, experts, block_m)
    pairs = ids.numel()
    assert block_expert.numel() == max_padded_blocks(pairs, experts, block_m)
    n = int(num_padded)
    real = sorted_ids[:n][sorted_ids[:n] < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # each pair once
    assert torch.all(sorted_ids[n:] == pairs)  # past the end: padding only
    flat = ids.reshape(-1)
    for b in range(n // block_m):  # every block holds pairs of its own expert (or padding)
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        rows = rows[rows < pairs]
        assert torch.all(flat[rows.long()] == block_expert[b])
    assert torch.all(block_expert[n // block_m :] == experts)  # spare blocks: exit at once
    counts = torch.bincount(flat, minlength=experts)
    assert n == int(((counts + block_m - 1) // block_m * block_m).sum())


def test_zero_tokens_and_bad_shapes():
    x, w13, w2, weights, ids = make_layer(2, 4, 2, 32, 16, torch.float32, DEVICE)
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="expert weights"):
        fused_moe(x, w13, w2[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe(x, w13, w2, weights[:, :1], ids)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("tokens", [1, 2, 16, 64, 256, 1024, 4096])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_qwen3_30b_a3b_layer_matches_reference_bf16(tokens):
    s = QWEN3_30B_A3B
    x, w13, w2, weights, ids = make_layer(tokens, s["experts"], s["top_k"], s["hidden"], s["inter"],
                                          torch.bfloat16, "cuda", seed=tokens)
    assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_reference(x, w13, w2, weights, ids))


@pytest.mark.parametrize("case", list(SMALL))
@pytest.mark.parametrize("skew", [None, 2], ids=["spread", "skewed"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16", marks=GPU),
                                   pytest.param(torch.float16, id="fp16", marks=GPU)])
def test_fused_moe_small_shapes_16bit(case, skew, dtype):
    tokens, experts, top_k, hidden, inter = SMALL[case]
    x, w13, w2, weights, ids = make_layer(tokens * 16, experts, top_k, hidden * 4, inter * 4, dtype, "cuda",
                                          skew=skew)
    assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_reference(x, w13, w2, weights, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_replays_with_new_routing():
    s = QWEN3_30B_A3B
    x, w13, w2, weights, ids = make_layer(8, s["experts"], s["top_k"], s["hidden"], s["inter"], torch.bfloat16,
                                          "cuda")
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for seed in range(3):
        _, _, _, new_weights, new_ids = make_layer(8, s["experts"], s["top_k"], s["hidden"], s["inter"],
                                                   torch.bfloat16, "cuda", seed=100 + seed, skew=seed)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, fused_moe_reference(x, w13, w2, weights, ids))
