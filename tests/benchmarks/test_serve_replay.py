"""`bench throughput --workload serve`: bench serve's exact workload, replayed through the engine without HTTP."""

import csv
import time

import pytest

from nanovllm.bench import serve as bench_serve
from nanovllm.bench.replay import replay
from nanovllm.bench.throughput import add_args as throughput_args
from nanovllm.bench.throughput import run as throughput_run
from nanovllm.bench.workload import make_workload


def throughput_parser():
    import argparse

    p = argparse.ArgumentParser()
    throughput_args(p)
    return p


WORKLOAD_FLAGS = ["--num-prompts", "9", "--input-len", "12", "--output-len", "5", "--max-concurrency", "3",
                  "--request-rate", "40", "--seed", "7", "--ignore-eos", "--temperature", "0.6",
                  "--token-id-range", "3", "900"]


def test_both_benchmarks_build_the_same_workload():
    served = bench_serve.parse_args(WORKLOAD_FLAGS)
    offline = throughput_parser().parse_args(["--model", "m", "--workload", "serve"] + WORKLOAD_FLAGS)
    a = make_workload(served, bench_serve.prompt_kind(served))
    b = make_workload(offline, offline.prompt_kind)
    assert a == b
    assert len(a) == 9 and all(len(p) == 12 and all(3 <= t < 900 for t in p) for p in a.prompts)
    assert a.max_concurrency == 3 and a.output_len == 5 and a.ignore_eos and a.temperature == 0.6
    assert all(d > 0 for d in a.delays)  # Poisson gaps at 40 req/s
    reseeded = [("8" if f == "7" else f) for f in WORKLOAD_FLAGS]
    other_seed = make_workload(throughput_parser().parse_args(["--model", "m", "--workload", "serve"] + reseeded))
    assert other_seed.prompts != a.prompts and other_seed.delays != a.delays


class _Watched:
    """An LLMEngine that notes when each request was added and the most unfinished at once."""

    def __init__(self, engine):
        self.engine = engine
        self.added: dict[str, float] = {}
        self.peak = 0

    def add_request(self, rid, prompt, params):
        self.added[rid] = time.perf_counter()
        self.engine.add_request(rid, prompt, params)
        self.peak = max(self.peak, self.engine.get_num_unfinished_requests())

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_replay_keeps_the_arrivals_the_cap_and_every_token(tiny_model_factory):
    from nanovllm import LLM, RequestOutputKind, SamplingParams

    args = throughput_parser().parse_args(["--model", "m", "--workload", "serve"] + WORKLOAD_FLAGS)
    workload = make_workload(args)
    llm = LLM(tiny_model_factory("qwen3"), skip_tokenizer_init=True, max_model_len=64)
    watched = _Watched(llm.engine)
    params = SamplingParams(temperature=0.6, max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    t0 = time.perf_counter()
    results, duration = replay(watched, workload, [params] * len(workload))
    assert [r.ok for r in results] == [True] * 9
    assert [r.output_tokens for r in results] == [5] * 9
    assert all(len(r.itl) == 4 and r.ttft > 0 and r.e2e >= r.ttft for r in results)
    assert watched.peak <= 3
    release = workload.release_times()
    order = sorted(watched.added, key=watched.added.get)
    assert order == [str(i) for i in range(9)]  # started in arrival order
    for i in range(9):
        assert watched.added[str(i)] - t0 >= release[i] - 1e-3  # never before its arrival
    assert duration >= release[-1]
    assert not llm.engine.has_unfinished_requests()


def test_cli_appends_a_replay_row_to_serve_csv(tiny_model_factory, tmp_path):
    csv_path = tmp_path / "serve.csv"
    args = throughput_parser().parse_args(
        ["--model", tiny_model_factory("qwen3"), "--workload", "serve", "--load-format", "auto",
         "--max-model-len", "64", "--csv", str(csv_path), "--label", "replay test",
         "--max-prefill-tokens-while-decoding", "16"] + WORKLOAD_FLAGS)
    assert throughput_run(args) == 0
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 1
    row = rows[0]
    assert row["bench"] == "replay" and row["endpoint"] == "offline" and row["label"] == "replay test"
    assert int(row["completed"]) == 9 and int(row["failed"]) == 0 and int(row["total_output_tokens"]) == 45
    assert float(row["output_throughput"]) > 0 and float(row["p99_ttft_ms"]) >= float(row["median_ttft_ms"])
    assert (tmp_path / "serve_replay.png").stat().st_size > 0
    # the served benchmark's columns: both kinds of rows land in one CSV section
    assert set(row) >= {"max_concurrency", "median_itl_ms", "p99_itl_ms", "request_rate", "input_len"}


def test_replay_refuses_a_bad_workload():
    args = throughput_parser().parse_args(["--model", "m", "--workload", "serve", "--max-concurrency", "0"])
    with pytest.raises(ValueError, match="max-concurrency"):
        make_workload(args)
