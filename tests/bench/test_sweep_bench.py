"""`nanovllm bench sweep` on CPU with a tiny model and a tiny grid (the CI smoke run of the GPU sweep)."""

import argparse
import csv

import pytest

from nanovllm.bench import sweep
from nanovllm.bench.sweep_plot import batch_sweep_rows

OUTPUT_LEN = 3


def parse(argv):
    p = argparse.ArgumentParser()
    sweep.add_args(p)
    return p.parse_args(argv)


def test_grid_points_run_a_shared_point_once():
    points = sweep.grid_points([128, 512], [1, 16], [1, 4, 16], 512)
    keys = [(p.batch, p.prompt_len) for p in points]
    assert len(keys) == len(set(keys)) == 5  # (1,512) and (16,512) are in both sweeps
    assert [(p.grid, p.batch) for p in points if p.grid == "batch"] == [("batch", 4)]
    full = sweep.grid_points(sweep.DEFAULT_PROMPT_LENS, sweep.DEFAULT_PROMPT_BATCHES, sweep.DEFAULT_BATCHES,
                             sweep.DEFAULT_BATCH_PROMPT_LEN)
    assert len(full) == 6 * 2 + 4  # the grid: 12 prompt points + batches 4, 8, 32, 64 at 512


@pytest.mark.parametrize("text", ["0,1", "a", ",", "-4"])
def test_int_list_refuses_bad_values(text):
    with pytest.raises(argparse.ArgumentTypeError):
        sweep.int_list(text)


def test_check_refuses_bad_flags_before_loading(monkeypatch):
    with pytest.raises(ValueError, match="--output-len"):
        sweep.check(parse(["--output-len", "1"]))
    with pytest.raises(ValueError, match="neither a directory"):
        sweep.check(parse(["--models", "no-such-model"]))
    monkeypatch.setenv("NANOVLLM_GEMV_FUSE", "0")
    with pytest.raises(ValueError, match="NANOVLLM_GEMV_FUSE"):
        sweep.check(parse(["--models", "qwen3-0.6b"]))


@pytest.mark.slow
def test_sweep_writes_rows_and_plot_for_both_fusion_settings(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("qwen3")
    args = parse(["--models", model, "--load-format", "auto", "--device", "cpu", "--prompt-lens", "5,12",
                  "--prompt-batches", "1,2", "--batches", "1,3", "--batch-prompt-len", "5",
                  "--output-len", str(OUTPUT_LEN), "--result-dir", str(tmp_path)])
    assert sweep.run(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    points = {(r["grid"], int(r["batch"]), int(r["prompt_len"])) for r in rows}
    assert points == {("prompt", 1, 5), ("prompt", 1, 12), ("prompt", 2, 5), ("prompt", 2, 12), ("batch", 3, 5)}
    assert sorted(r["fused"] for r in rows) == ["False"] * 5 + ["True"] * 5
    for r in rows:
        assert r["device"] and r["date"] and r["commit"]
        assert int(r["output_tokens"]) == int(r["batch"]) * OUTPUT_LEN
        assert float(r["e2e_s"]) * 1000 >= float(r["ttft_ms"]) > 0
        assert float(r["decode_tok_s"]) > 0
        assert r["peak_alloc_gib"] == "" and r["cuda_graphs"] == "False"  # CPU: no CUDA memory, no graphs
    assert len(batch_sweep_rows(rows)) == 2 * 3  # batches 1, 2 (prompt sweep) and 3 at prompt 5, both settings
    png = tmp_path / f"sweep_{rows[0]['model']}.png"
    assert png.stat().st_size > 10_000
    assert "fused=False" in capsys.readouterr().out


def test_kv_cache_holds_the_largest_point_not_the_product_of_maxima():
    points = sweep.grid_points([128, 4096], [1, 16], [64], 512)
    blocks = sweep.kv_blocks(points, 128, 4096 + 128 + 16)
    assert blocks == 16 * (4096 + 128) // 16 + 2 * 265  # batch 16 x 4224 tokens, plus two spare sequences
    assert blocks >= 64 * -(-(512 + 128) // 16)  # the batch-64 point fits too


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_sweep_records_peak_gpu_memory(tiny_model_factory, tmp_path):
    model = tiny_model_factory("qwen3")
    args = parse(["--models", model, "--load-format", "auto", "--prompt-lens", "16,64", "--prompt-batches", "1",
                  "--batches", "1,4", "--batch-prompt-len", "16", "--output-len", "8", "--result-dir", str(tmp_path)])
    assert sweep.run(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert len(rows) == 2 * 3 and {r["fused"] for r in rows} == {"True", "False"}
    for r in rows:
        assert float(r["peak_reserved_gib"]) >= float(r["peak_alloc_gib"]) > 0
        assert 0 <= float(r["act_peak_gib"]) <= float(r["peak_alloc_gib"])
        assert int(r["output_tokens"]) == int(r["batch"]) * 8 and float(r["e2e_s"]) * 1000 >= float(r["ttft_ms"])
