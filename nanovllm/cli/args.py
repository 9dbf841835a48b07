"""Argument helpers shared by every `nanovllm` subcommand (generate, chat, serve, bench)."""

from __future__ import annotations

import argparse

from nanovllm.config import QUANTIZATIONS


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        p.add_argument("model", nargs="?", default=None,
                       help="model: HF directory, repo id in the local HF cache, or .gguf file "
                            "(default: the bundled SmolLM2-135M-Instruct)")
    else:
        p.add_argument("--model", "-m", default=None,
                       help="model: HF directory, repo id in the local HF cache, or .gguf file "
                            "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (auto: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion in tokens")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch (default 256)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for weights + activations + KV cache (default 0.9)")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None,
                   help="scheduling policy: most prompt tokens computed per step, so new prompts cannot stretch "
                        "running requests' decode steps (default: no cap but the step budget; see docs/serving.md)")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="auto (the model's dtype, default) or fp8 (e4m3 with per-layer, per-KV-head scales: "
                        "twice the tokens in the same memory)")
    p.add_argument("--kv-cache-scales", default=None, type=_float_or_path,
                   help="fp8 KV cache scales: a number (every layer and head) or a JSON file "
                        "{\"k\": [[per KV head] per layer], \"v\": ...} (default: calibrated at start-up)")
    add_quantization_args(p)
    add_parallel_args(p)


def add_quantization_args(p: argparse.ArgumentParser) -> None:
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


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="split the model over this many GPUs (or CPU processes with --device cpu); "
                        "default 1. See docs/parallelism.md")
    p.add_argument("--distributed-executor-backend", choices=("uni", "mp"), default=None,
                   help="uni = one process, mp = one process per rank (default: mp when -tp > 1)")


def parallel_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {}
    for name in ("tensor_parallel_size", "distributed_executor_backend"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    return kwargs


def _float_or_path(value: str):
    """--kv-cache-scales: a number is a scale, anything else a JSON file path."""
    try:
        return float(value)
    except ValueError:
        return value


def engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"device": args.device, "dtype": args.dtype, "enforce_eager": args.enforce_eager, **parallel_kwargs(args)}
    for name in ("max_model_len", "max_num_seqs", "gpu_memory_utilization", "max_prefill_tokens_while_decoding",
                 "kv_cache_dtype", "kv_cache_scales"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    return {**kwargs, **quantization_kwargs(args)}


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
