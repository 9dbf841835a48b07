"""Programmatic dependent launch: off on CPU and when disabled; on the GPU a chain of PDL
launches (norm -> GEMV -> SiLU -> norm ..., graph-captured) gives bit-identical results to
the same chain launched without PDL, so no kernel reads its input before the producer is done.
"""

from __future__ import annotations

import pytest
import torch

from nanovllm.kernels import pdl
from nanovllm.kernels.activation import silu_and_mul
from nanovllm.kernels.gemv import GemvConfig, skinny_gemm
from nanovllm.kernels.rmsnorm import fused_add_rms_norm

from kernel_params import HAS_CUDA

HIDDEN, INTER, LAYERS = 1024, 2048, 6
GEMV_CONFIG = GemvConfig(2, 1024, 4, 1)  # fixed: no autotuning inside the captured chain


def test_pdl_is_off_for_cpu_tensors_and_when_disabled():
    assert not pdl.use_pdl(torch.zeros(1))
    assert pdl.pdl_launch_options(False) == {}
    assert pdl.pdl_launch_options(True) == {"launch_pdl": True}
    if HAS_CUDA:
        x = torch.zeros(1, device="cuda")
        assert not pdl.use_pdl(x, enabled=False)
        assert pdl.use_pdl(x) == pdl._device_supports_pdl(torch.cuda.current_device())


def _chain(x, residual, weights, enabled: bool):
    """LAYERS x (add+norm -> gate_up GEMV -> SiLU-mul -> down GEMV): each kernel consumes
    the previous one's output, the pattern of a batch-1 decode step."""
    for norm_w, w_up, w_down in weights:
        h, residual = fused_add_rms_norm(x, residual, norm_w, 1e-6, pdl=enabled)
        up = skinny_gemm(h, w_up, config=GEMV_CONFIG, pdl=enabled)  # [1, 2 * INTER]
        x = skinny_gemm(silu_and_mul(up, pdl=enabled), w_down, config=GEMV_CONFIG, pdl=enabled)  # [1, HIDDEN]
    return x, residual


def _graphed_chain(weights, x0, r0, enabled: bool):
    x, r = x0.clone(), r0.clone()
    _chain(x, r, weights, enabled)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res = _chain(x, r, weights, enabled)
    results = []
    for step in range(3):  # new inputs each replay, as a decode step gets
        x.copy_(x0 * (step + 1))
        r.copy_(r0 - step)
        graph.replay()
        results.append((out.clone(), res.clone()))
    torch.cuda.synchronize()
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pdl_chain_matches_plain_launches(dtype):
    if not pdl._device_supports_pdl(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability >= 9 and a Triton with launch_pdl")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", dtype)

    weights = [(rand(HIDDEN) + 1, rand(2 * INTER, HIDDEN, scale=HIDDEN ** -0.5), rand(HIDDEN, INTER, scale=INTER ** -0.5))
               for _ in range(LAYERS)]
    x0, r0 = rand(1, HIDDEN), rand(1, HIDDEN)
    with_pdl = _graphed_chain(weights, x0, r0, True)
    without = _graphed_chain(weights, x0, r0, False)
    for (a_out, a_res), (b_out, b_res) in zip(with_pdl, without):
        assert torch.equal(a_out, b_out) and torch.equal(a_res, b_res)
    assert not torch.equal(with_pdl[0][0], with_pdl[1][0])  # the replays really saw new inputs

