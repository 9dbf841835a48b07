"""`--kv-cache-dtype` / `--kv-cache-scales` on the engine commands (generate, chat, serve) and the
throughput bench's switches: parsed into engine arguments, bad values refused with a message."""

from __future__ import annotations

import pytest

from nanovllm.cli.args import engine_kwargs
from nanovllm.cli.main import build_parser, main


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_kv_cache_flags_reach_the_engine(command):
    args = build_parser().parse_args(command + ["--kv-cache-dtype", "fp8", "--kv-cache-scales", "0.05"])
    kw = engine_kwargs(args)
    assert kw["kv_cache_dtype"] == "fp8" and kw["kv_cache_scales"] == 0.05
    args = build_parser().parse_args(command + ["--kv-cache-dtype", "fp8", "--kv-cache-scales", "s.json"])
    assert engine_kwargs(args)["kv_cache_scales"] == "s.json"
    assert engine_kwargs(build_parser().parse_args(command))["kv_cache_dtype"] == "auto"  # default: the model's dtype


def test_serve_accepts_kv_cache_flags():
    pytest.importorskip("fastapi")
    args = build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "fp8"])
    assert engine_kwargs(args)["kv_cache_dtype"] == "fp8"


@pytest.mark.parametrize("flags,message", [
    (["--kv-cache-dtype", "int8"], "kv_cache_dtype"),
    (["--kv-cache-scales", "0.5"], "kv_cache_dtype='fp8'"),
    (["--kv-cache-dtype", "fp8", "--kv-cache-scales", "-1"], "positive"),
])
def test_bad_kv_cache_flags_exit_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the command's usage and the message, before any model loads
        main(["generate", "hi", "--device", "cpu"] + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_throughput_switches():
    args = build_parser().parse_args(["bench", "throughput", "--model", "m", "--kv-cache-dtype", "fp8",
                                      "--decode-split", "balanced", "--timeline"])
    from nanovllm.bench.throughput import backend_label

    assert (args.kv_cache_dtype, args.decode_split, args.timeline) == ("fp8", "balanced", True)
    assert backend_label(args) == "nanovllm (kv=fp8 split=balanced)"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "throughput", "--model", "m", "--decode-split", "wide"])
