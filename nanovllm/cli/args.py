"""Argument helpers shared by every `nanovllm` subcommand (generate, chat, serve, bench)."""

from __future__ import annotations

import argparse

from nanovllm.config import QUANTIZATIONS


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    """The engine flags (EngineArgs, vLLM's spellings); validated before any model loads (cli/main.py)."""
    from nanovllm.engine.arg_utils import EngineArgs

    EngineArgs.add_cli_args(p, model_positional=model_positional)
    p.set_defaults(_has_engine_args=True)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """-tp and the executor for commands without the full engine flags (bench throughput / latency)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="split the model over this many GPUs (or CPU processes with --device cpu); "
                        "default 1. See docs/parallelism.md")
    p.add_argument("--distributed-executor-backend", choices=("uni", "mp"), default=None,
                   help="uni = one process, mp = one process per rank (default: mp when -tp > 1)")


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    """--quantization for commands without the full engine flags (bench latency / throughput / ...)."""
    p.add_argument("--quantization", "-q", default=None, type=str.lower, choices=QUANTIZATIONS,
                   help="quantize the weights at load: int8 (per channel), int4 (groups of 128), fp8 (e4m3); "
                        "default: as the checkpoint is (GPTQ / AWQ / GGUF stay quantized)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head (with --quantization)")


def quantization_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    if getattr(args, "quantization", None):
        kwargs["quantization"] = args.quantization
    if getattr(args, "quantize_lm_head", False):
        kwargs["quantize_lm_head"] = True
    return kwargs


def parallel_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    for name in ("tensor_parallel_size", "distributed_executor_backend"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    return kwargs


def engine_args(args: argparse.Namespace):
    """The EngineArgs of parsed flags."""
    from nanovllm.engine.arg_utils import EngineArgs

    return EngineArgs.from_cli_args(args)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for LLM(...) from parsed engine flags."""
    return engine_args(args).as_kwargs()


def add_sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=default_temperature,
                   help=f"sampling temperature, 0 = greedy (default {default_temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the request, for reproducible sampling")


def sampling_params(args: argparse.Namespace):
    from nanovllm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
