"""`nanovllm bench prefix` end to end on CPU at tiny settings (the CI smoke run of the GPU benchmark)."""

import argparse
import csv

import pytest

from nanovllm.bench import prefix


@pytest.mark.slow
def test_prefix_bench_runs_all_parts_on_cpu(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("qwen3")
    parser = argparse.ArgumentParser()
    prefix.add_args(parser)
    argv = ["--model", model, "--load-format", "auto", "--device", "cpu", "--num-requests", "4", "--prefix-len", "48",
            "--unique-len", "5", "--output-len", "4",
            "--cascade-mode", "force", "--ttft-repeats", "1", "--num-decodes", "3", "--decode-prompt-len", "9",
            "--gap-steps-before", "4", "--gap-steps-after", "8", "--long-prompt-len", "40", "--prefill-cap", "16",
            "--result-dir", str(tmp_path)]
    assert prefix.run(parser.parse_args(argv)) == 0
    stdout = capsys.readouterr().out
    rows = {(r["part"], r["mode"]): r for r in csv.DictReader(open(tmp_path / "prefix.csv"))}
    assert set(rows) == {("a", "cache+cascade"), ("a", "cache"), ("a", "none"), ("b", "uncached"), ("b", "cached"),
                         ("c", "chunked"), ("c", "unchunked")}
    for mode in ("cache+cascade", "cache"):  # every timed request finds the system prompt's 3 blocks
        assert float(rows[("a", mode)]["prefix_hit_rate"]) == pytest.approx(48 / 53, abs=1e-3)
    assert float(rows[("a", "none")]["prefix_hit_rate"]) == 0
    assert int(rows[("a", "cache+cascade")]["cascade_steps"]) > 0 and int(rows[("a", "cache")]["cascade_steps"]) == 0
    assert all(float(rows[("a", m)]["output_tok_per_s"]) > 0 for m in ("cache+cascade", "cache", "none"))
    assert int(rows[("b", "cached")]["cached_tokens"]) == 48 and int(rows[("b", "uncached")]["cached_tokens"]) == 0
    for mode in ("chunked", "unchunked"):
        r = rows[("c", mode)]
        assert float(r["worst_gap_ms"]) >= float(r["median_gap_ms"]) > 0
    assert "x throughput" in stdout and (tmp_path / "prefix.png").stat().st_size > 0
