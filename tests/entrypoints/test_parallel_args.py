"""-tp / --tensor-parallel-size and --distributed-executor-backend on every engine-starting
command (generate, chat, serve, bench throughput, bench latency), and the benchmark CSV
columns that record them. `bench serve` drives a server started by `nanovllm serve -tp N`
and has no engine of its own. No worker process is started here: the two-rank runs are in
tests/worker/test_tensor_parallel.py and tests/serve/test_tensor_parallel_serve.py."""

from __future__ import annotations

import argparse
import csv

import pytest

from nanovllm.cli.args import engine_kwargs, parallel_kwargs
from nanovllm.cli.main import build_parser
from nanovllm.engine.arg_utils import EngineArgs
from tiny_models import build_tiny_model

COMMANDS = {
    "generate": ["generate", "hello"],
    "chat": ["chat"],
    "serve": ["serve", "some-model"],
    "bench throughput": ["bench", "throughput", "--model", "m"],
    "bench latency": ["bench", "latency", "--model", "m"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flags,expected", [
    (["-tp", "2"], {"tensor_parallel_size": 2}),
    (["--tensor-parallel-size", "4", "--distributed-executor-backend", "mp"],
     {"tensor_parallel_size": 4, "distributed_executor_backend": "mp"}),
    ([], {}),  # unset: the engine's defaults (size 1, in-process)
])
def test_every_engine_command_takes_the_parallel_flags(command, flags, expected):
    args = build_parser().parse_args(COMMANDS[command] + flags)
    # the engine commands' flags carry vLLM's default size 1 (EngineArgs); the benches' leave it unset
    unset = {} if command.startswith("bench") else {"tensor_parallel_size": 1}
    assert parallel_kwargs(args) == (expected or unset)
    if not command.startswith("bench"):
        kwargs = engine_kwargs(args)
        assert {k: kwargs[k] for k in expected} == expected
        for name in {"tensor_parallel_size", "distributed_executor_backend"} - set(expected):  # unset: defaults
            assert kwargs[name] == getattr(EngineArgs(), name)


def test_the_serve_workload_replay_passes_them_to_its_engine():
    """`bench throughput --workload serve` builds its engine from its own argument list."""
    from nanovllm.bench.replay import engine_kwargs as replay_engine_kwargs

    args = build_parser().parse_args(COMMANDS["bench throughput"] + ["--workload", "serve", "-tp", "2"])
    assert replay_engine_kwargs(args)["tensor_parallel_size"] == 2


def test_an_unknown_executor_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "hi", "--distributed-executor-backend", "ray"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'ray'" in capsys.readouterr().err


def test_throughput_csv_records_the_parallel_layout(tmp_path, monkeypatch):
    """The multi-process executor at size 1 (the A/B against in-process): the row says tp=1,
    executor=mp, next to the numbers."""
    from nanovllm.bench import throughput

    model = build_tiny_model("llama", str(tmp_path / "llama"), vocab_size=throughput.TOKEN_ID_MAX + 1)
    # the warm-up compiles GPU kernels before the timing: nothing to compile on CPU, and slow there
    monkeypatch.setattr(throughput, "warm_up", lambda llm, *args: None)
    path = tmp_path / "throughput.csv"
    args = build_parser().parse_args(["bench", "throughput", "--model", model, "--num-seqs", "2",
                                      "--max-input-len", "110", "--max-output-len", "104", "--max-model-len", "256",
                                      "--distributed-executor-backend", "mp", "--csv", str(path)])
    assert isinstance(args, argparse.Namespace) and args.func(args) == 0
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 1
    assert rows[0]["tp"] == "1" and rows[0]["executor"] == "mp"
    assert float(rows[0]["output_tok_per_s"]) > 0
