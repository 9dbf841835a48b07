"""`nanovllm bench fusion` on the CPU: it refuses without CUDA; its shape table and byte counts are right."""

import json
import os

import pytest
import torch

from nanovllm.bench import fusion
from nanovllm.bench.sweep import model_dir
from nanovllm.cli.main import main

# Published parameter counts (shared notes, model-configs.md): the projections a decode step
# reads, plus the input embedding when it is not tied to the LM head, must add up to them.
PUBLISHED_PARAMS = {"qwen3-0.6b": 0.596e9, "qwen3-8b": 8.19e9}


def config(name: str) -> dict:
    with open(os.path.join(model_dir(name), "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_decode_shapes_cover_the_models_weights(name):
    cfg = config(name)
    shapes = fusion.decode_shapes(cfg)
    assert [s.proj for s in shapes] == ["qkv", "o", "gate_up", "down", "lm_head"]
    embed = 0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * cfg["hidden_size"]
    total = sum(s.n * s.k * s.layers for s in shapes) + embed
    assert total == pytest.approx(PUBLISHED_PARAMS[name], rel=2e-3)
    assert all(s.k in (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * cfg["head_dim"])
               for s in shapes)


def test_decode_shapes_of_qwen3_8b():
    by_proj = {s.proj: (s.n, s.k, s.layers) for s in fusion.decode_shapes(config("qwen3-8b"))}
    assert by_proj == {"qkv": ((32 + 2 * 8) * 128, 4096, 36), "o": (4096, 32 * 128, 36),
                       "gate_up": (2 * 12288, 4096, 36), "down": (4096, 12288, 36), "lm_head": (151936, 4096, 1)}


def test_moved_bytes_counts_weight_and_activations():
    m, n, k = 4, 6, 5
    weight, x_res_in_res_out, norm, out = n * k, 3 * m * k, k, m * n
    assert fusion.moved_bytes(m, n, k, elem=2) == 2 * (weight + x_res_in_res_out + norm + out)
    assert fusion.moved_bytes(m, n, k, elem=1) == fusion.moved_bytes(m, n, k, elem=2) // 2
    # batch 1 on Qwen3-8B's gate_up: the weight is all but a thousandth of the bytes
    assert fusion.moved_bytes(1, 24576, 4096) / (2 * 24576 * 4096) == pytest.approx(1, abs=1e-3)


def test_fused_implementations_stop_at_the_skinny_gemm_limit():
    assert fusion.impls_for(8, 8) == fusion.IMPLS
    assert fusion.impls_for(16, 8) == ("norm+cublas", "cublas")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "fusion", "--models", "qwen3-0.6b"])
    assert exc.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_shape_times_every_implementation_on_the_gpu():
    from nanovllm.bench.latency import measure_copy_bandwidth

    copy_bw = measure_copy_bandwidth()
    rows = fusion.bench_shape(fusion.DecodeShape("qkv", 4096, 1024, 28), [1, 16], copy_bw)
    assert {(r["m"], r["impl"]) for r in rows} == {(1, i) for i in fusion.IMPLS} | {(16, "norm+cublas"), (16, "cublas")}
    for r in rows:
        assert r["us"] > 0 and 0 < r["pct_copy"] < 150  # weights rotated out of L2: not far above the copy rate
        assert r["gbps"] == pytest.approx(r["bytes"] / r["us"] / 1e3, rel=1e-2)
