"""Bounded load test: 200 streamed requests at concurrency 32 through `nanovllm bench serve`'s code."""

from __future__ import annotations

import asyncio

import pytest

from nanovllm.bench.serve import benchmark, parse_args, print_summary

NUM_PROMPTS = 200
CONCURRENCY = 32
OUTPUT_LEN = 8


@pytest.mark.slow
def test_load_200_requests_concurrency_32(server):
    before = server.metrics()
    args = parse_args(["--base-url", server.url, "--api-key", server.api_key, "--num-prompts", str(NUM_PROMPTS),
                       "--max-concurrency", str(CONCURRENCY), "--input-len", "32", "--output-len", str(OUTPUT_LEN),
                       "--ignore-eos", "--no-save", "--timeout", "300"])
    summary = asyncio.run(benchmark(args))
    print_summary(summary)  # visible with `pytest -s`: requests/s and latency percentiles
    assert summary["failed"] == 0, summary["errors"]
    assert summary["completed"] == NUM_PROMPTS
    assert summary["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert summary["request_throughput"] > 0 and summary["p99_ttft_ms"] >= summary["median_ttft_ms"] > 0
    assert summary["median_itl_ms"] > 0 and summary["p99_e2e_ms"] >= summary["median_e2e_ms"]

    after = server.wait_idle(timeout=60)  # no leaked block, nothing left running
    assert after["nanovllm:num_requests_running"] == 0
    assert after["nanovllm:num_requests_waiting"] == 0
    assert after["nanovllm:kv_cache_usage_perc"] == 0
    assert after["nanovllm:generation_tokens_total"] - before["nanovllm:generation_tokens_total"] == (
        NUM_PROMPTS * OUTPUT_LEN)
    finished = (after["nanovllm:e2e_request_latency_seconds_count"]
                - before.get("nanovllm:e2e_request_latency_seconds_count", 0))
    assert finished == NUM_PROMPTS
    assert (after["nanovllm:time_to_first_token_seconds_count"]
            - before.get("nanovllm:time_to_first_token_seconds_count", 0)) == NUM_PROMPTS
    assert (after["nanovllm:inter_token_latency_seconds_count"]
            - before.get("nanovllm:inter_token_latency_seconds_count", 0)) == NUM_PROMPTS * (OUTPUT_LEN - 1)
