"""`python -m nanovllm.bench.kv_quality` on CPU: a tiny random model through the same three engines
(fp32 reference, bf16 KV, fp8 KV) the GPU run uses on Qwen3-0.6B (tests/gpu/test_kv_fp8_gpu.py)."""

from __future__ import annotations

import csv

from nanovllm.bench import kv_quality


def test_kv_quality_measures_both_caches_against_fp32(tiny_model_factory, tmp_path):
    path = str(tmp_path / "q.csv")
    assert kv_quality.main(["--model", tiny_model_factory("qwen3"), "--device", "cpu", "--num-prompts", "3",
                            "--top-k", "4", "--max-prompt-len", "256",
                            "--csv", path]) == 0
    with open(path) as f:
        rows = {r["kv_cache_dtype"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"bfloat16", "fp8"}
    for r in rows.values():
        assert int(r["num_prompts"]) == 3
        assert int(r["first_token_agree_ref"]) >= 2
        assert 0 < float(r["top_logprob_mae"]) < 0.1  # bf16 and fp8 both differ from fp32, by little
    assert float(rows["fp8"]["top_logprob_mae"]) >= float(rows["bfloat16"]["top_logprob_mae"]) * 0.5


def test_kv_quality_is_a_bench_subcommand():
    from nanovllm.cli.main import build_parser

    args = build_parser().parse_args(["bench", "kv-quality", "--model", "m", "--num-prompts", "2"])
    assert args.func is kv_quality.run and args.num_prompts == 2 and args.top_k == kv_quality.TOP_K
