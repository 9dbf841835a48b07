"""The per-step timeline (`step_timeline=True`, `bench throughput --timeline`): what each step
records on a real engine run, and how the summary splits the time above the floor."""

from __future__ import annotations

import csv

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.bench import step_timeline as timeline
from nanovllm.worker.timeline import KIND_DECODE, KIND_MIXED, KIND_PREFILL, StepRecord

BANDWIDTH = 1e12
PEAK = 1e15


def record(step, kind, num_seqs, nbytes, gpu_ms, gap_ms=0.0):
    return StepRecord(step, kind, num_seqs, num_seqs, 0, 0, num_seqs, nbytes, 0.0, gpu_ms=gpu_ms, gap_ms=gap_ms)


def test_summary_buckets_prefill_decode_bands_tail_and_gaps():
    one_ms = int(BANDWIDTH / 1e3)  # bytes read in 1 ms
    records = [
        record(0, KIND_PREFILL, 40, 2 * one_ms, 3.0),  # 1 ms above a 2 ms floor
        record(1, KIND_MIXED, 64, one_ms, 1.5, gap_ms=0.25),
        record(2, KIND_DECODE, 64, one_ms, 1.25),  # band 33-128 (not tail: prefill follows)
        record(3, KIND_PREFILL, 64, one_ms, 1.0),
        record(4, KIND_DECODE, 20, one_ms, 2.0, gap_ms=0.5),  # band 9-32 (20 >= 64 / 8)
        record(5, KIND_DECODE, 7, one_ms, 3.0),  # tail: after the last prefill, < 1/8 of the peak
        record(6, KIND_DECODE, 1, one_ms, 0.5),  # tail, below its floor: counts 0 above
    ]
    assert timeline.bucket_of(records) == ["prefill", "prefill", "decode 33-128", "prefill", "decode 9-32",
                                           "tail", "tail"]
    s = timeline.summarize(records, BANDWIDTH, PEAK)
    assert s["prefill"]["steps"] == 3
    assert s["prefill"]["above_s"] == pytest.approx((1.0 + 0.5 + 0.0) / 1e3)
    assert s["decode 33-128"]["above_s"] == pytest.approx(0.25e-3)
    assert s["decode 9-32"]["above_s"] == pytest.approx(1e-3)
    assert s["tail"] == {"steps": 2, "gpu_s": pytest.approx(3.5e-3), "floor_s": pytest.approx(2e-3),
                         "above_s": pytest.approx(2e-3)}
    assert s["host gaps"]["above_s"] == pytest.approx(0.75e-3)
    assert s["decode 1-8"]["steps"] == 0  # small batches before the end are not the tail's
    text = timeline.format_summary(s)
    assert "tail" in text and "decode 1-8" not in text


def test_engine_records_every_step_and_bench_files(tiny_model_factory, tmp_path):
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", dtype="float32",
              max_model_len=128, max_num_batched_tokens=64, step_timeline=True)
    recorder = llm.engine.executor.worker.runner.timeline
    # disjoint prompts (no prefix-cache hits): every prompt token is computed
    prompts = [{"prompt_token_ids": list(range(s, s + n))} for s, n in ((3, 100), (200, 10), (300, 30))]
    out_lens = [5, 12, 3]
    llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens],
                 use_tqdm=False)
    records = recorder.records
    assert [r.step for r in records] == list(range(len(records)))
    # every prompt token and every generated token but each request's last is computed once
    assert sum(r.num_tokens for r in records) == 140 + sum(out_lens) - len(out_lens)
    assert sum(r.num_prefill_tokens for r in records) == 140
    assert records[0].kind == KIND_PREFILL and records[-1].kind == KIND_DECODE
    assert sum(r.num_sampled for r in records) == sum(out_lens)
    assert all(r.bytes > 0 and r.flops > 0 and r.gpu_ms > 0 for r in records)
    summary = timeline.summarize(records, BANDWIDTH, PEAK)
    assert sum(v["steps"] for k, v in summary.items() if k != "host gaps") == len(records)
    assert sum(v["gpu_s"] for v in summary.values()) == pytest.approx(sum(r.gpu_ms for r in records) / 1e3)

    path = timeline.write_csv(str(tmp_path / "t.csv"), records, BANDWIDTH, PEAK)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and {"kind", "gpu_ms", "gap_ms", "floor_ms", "bucket"} <= set(rows[0])
    assert (tmp_path / "t.png").exists() is False
    timeline.plot(str(tmp_path / "t.png"), records, "tiny")
    assert (tmp_path / "t.png").stat().st_size > 0
