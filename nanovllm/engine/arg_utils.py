"""EngineArgs: every engine argument in one dataclass, with vLLM's names and CLI flags.

    parser = argparse.ArgumentParser(); EngineArgs.add_cli_args(parser)
    args = parser.parse_args(); llm = LLM(**vars(args))           # vLLM's example scripts
    config = EngineArgs.from_cli_args(args).create_engine_config()

Three kinds of fields:
- honoured: they become EngineConfig fields (validated there);
- accepted for vLLM compatibility but meaningless here (`swap_space`, `disable_log_stats`,
  ...): a value other than the default logs one warning line and is otherwise ignored;
- accepted only at their neutral value (`pipeline_parallel_size=1`, `enable_lora=False`,
  ...): anything else would change results, so it is a ValueError.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from nanovllm.config import (CASCADE_MODES, DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION,
                             DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, DTYPE_ALIASES, EXECUTOR_BACKENDS,
                             LOAD_FORMATS, QUANTIZATIONS, SUPPORTED_DTYPES, EngineConfig)

logger = logging.getLogger("nanovllm")

# vLLM arguments that have no meaning in nanovllm: warned about (once) when changed, then ignored.
IGNORED_ARGS: dict[str, Any] = {
    "tokenizer_mode": "auto",
    "tokenizer_revision": None,
    "code_revision": None,
    "hf_token": None,
    "swap_space": 4,
    "cpu_offload_gb": 0,
    "disable_log_stats": False,
    "disable_log_requests": False,
    "max_seq_len_to_capture": 8192,
    "disable_custom_all_reduce": False,
    "compilation_config": None,
    "max_logprobs": 20,
    "limit_mm_per_prompt": None,
    "mm_processor_kwargs": None,
    "enable_sleep_mode": False,
    "served_model_name": None,
    "worker_cls": "auto",
    "disable_async_output_proc": False,
    "use_v2_block_manager": True,
    "guided_decoding_backend": "auto",
    "structured_outputs_config": None,
    "hf_overrides": None,
    "override_generation_config": None,
}

# vLLM arguments accepted only at these values (anything else would change what runs).
NEUTRAL_ONLY_ARGS: dict[str, tuple] = {
    "pipeline_parallel_size": (1,),
    "data_parallel_size": (1,),
    "enable_lora": (False,),
    "speculative_config": (None,),
    "task": ("auto", "generate"),
    "runner": ("auto", "generate"),
    "enable_expert_parallel": (False,),
}

# vLLM spells this one differently; it maps onto our field.
ALIASES = {"num_gpu_blocks_override": "num_kv_blocks"}


@dataclass
class EngineArgs:
    """Arguments of LLM(...) / `nanovllm serve`: EngineConfig's fields plus vLLM's others."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    download_dir: Optional[str] = None
    load_format: str = "auto"
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    allow_long_max_model_len: bool = False
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: Optional[int] = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_prefill_tokens_while_decoding: Optional[int] = None
    cascade_attention: str = "auto"
    enforce_eager: bool = False
    async_scheduling: Optional[bool] = None
    attention_backend: str = "auto"
    skip_tokenizer_init: bool = False
    cpu_weight_format: str = "auto"
    generation_config: str = "auto"
    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    quantization: Optional[str] = None
    quantize_lm_head: bool = False
    kv_cache_dtype: str = "auto"
    kv_cache_scales: Optional[Union[float, str]] = None
    # kernel choices (GPU A/B runs; the NANOVLLM_* variables in envs.py override them)
    gemv: str = "auto"
    fuse_gemv_prologues: bool = True
    pdl: bool = True
    use_triton: bool = True
    step_timing: bool = False
    decode_split: str = "uniform"
    step_timeline: bool = False
    engine_process: bool = False  # `nanovllm serve --engine-process` (AsyncLLMEngine only)
    # vLLM's other arguments (see IGNORED_ARGS / NEUTRAL_ONLY_ARGS)
    compat: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineArgs":
        """Like EngineArgs(**kwargs), but vLLM-only names go to `compat` and unknown names raise TypeError."""
        own = {f.name for f in fields(cls)} - {"compat"}
        values, compat = {}, {}
        for name, value in kwargs.items():
            name = ALIASES.get(name, name)
            if name in own:
                values[name] = value
            elif name in IGNORED_ARGS or name in NEUTRAL_ONLY_ARGS:
                compat[name] = value
            else:
                known = sorted(own | set(IGNORED_ARGS) | set(NEUTRAL_ONLY_ARGS) | set(ALIASES))
                raise TypeError(f"unknown engine argument {name!r}; known: {known}")
        return cls(**values, compat=compat)

    def create_engine_config(self) -> EngineConfig:
        """The validated EngineConfig (ValueError/TypeError say what to change); warns about ignored args."""
        for name, value in self.compat.items():
            if name in NEUTRAL_ONLY_ARGS:
                allowed = NEUTRAL_ONLY_ARGS[name]
                if value not in allowed:
                    raise ValueError(f"{name}={value!r} is not supported by nanovllm; use "
                                     f"{' or '.join(repr(a) for a in allowed)}")
            elif value != IGNORED_ARGS[name]:
                logger.warning("%s=%r has no effect in nanovllm and is ignored", name, value)
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "compat"}
        return EngineConfig(**values)

    # ------------------------------------------------------------------ command line
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> argparse.ArgumentParser:
        """Add the engine flags (vLLM's spellings) to `parser`; returns it, as vLLM's does."""
        g = parser.add_argument_group("engine")
        model_help = ("model: HF directory, .gguf file, or a hub repo id (downloaded into the HF cache when "
                      "missing); default: the bundled SmolLM2-135M-Instruct")
        if model_positional:
            g.add_argument("model", nargs="?", default=None, help=model_help)
        else:
            g.add_argument("--model", "-m", default=None, help=model_help)
        g.add_argument("--tokenizer", default=None, help="tokenizer directory or repo id (default: the model's)")
        g.add_argument("--revision", default=None, help="branch, tag or commit of a hub model")
        g.add_argument("--download-dir", default=None,
                       help="Hugging Face cache directory to look in and download to (default: $HF_HUB_CACHE)")
        g.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                       help="auto = the checkpoint's weights; dummy = random weights (benchmarks)")
        g.add_argument("--trust-remote-code", action="store_true", help="allow custom code in the model's repo")
        g.add_argument("--device", default="auto", type=_device, help="auto (CUDA when present), cpu, cuda or cuda:N")
        g.add_argument("--dtype", default="auto", type=_dtype,
                       help="auto, float32, float16 or bfloat16 (auto: fp32 on CPU, bf16 on GPU)")
        if "--seed" not in parser._option_string_actions:  # a command's own --seed (a request seed) wins
            g.add_argument("--seed", type=int, default=0, help="engine seed (default 0)")
        g.add_argument("--max-model-len", type=positive_int, default=None,
                       help="longest prompt + completion in tokens (default: the model's, capped at 32768)")
        g.add_argument("--allow-long-max-model-len", action="store_true",
                       help="accept a --max-model-len beyond the model's max_position_embeddings "
                            "(untrained positions; vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
        g.add_argument("--max-num-seqs", type=positive_int, default=DEFAULT_MAX_NUM_SEQS,
                       help=f"most sequences in one batch (default {DEFAULT_MAX_NUM_SEQS})")
        g.add_argument("--max-num-batched-tokens", type=positive_int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                       help=f"token budget of one step (default {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
        g.add_argument("--block-size", type=positive_int, default=DEFAULT_BLOCK_SIZE,
                       help=f"tokens per KV-cache block, a power of two (default {DEFAULT_BLOCK_SIZE})")
        g.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", dest="num_kv_blocks", type=positive_int,
                       default=None, help="KV-cache blocks (default: sized from memory)")
        g.add_argument("--gpu-memory-utilization", type=_fraction, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                       help=f"fraction of GPU memory for weights + activations + KV cache "
                            f"(default {DEFAULT_GPU_MEMORY_UTILIZATION})")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV cache of shared prompt prefixes (default on)")
        g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="split long prompts over several steps (default on)")
        g.add_argument("--max-prefill-tokens-while-decoding", type=positive_int, default=None,
                       help="most prompt tokens per step while requests decode, so long prompts do not stall "
                            "them (default: no cap; needs chunked prefill)")
        g.add_argument("--cascade-attention", choices=CASCADE_MODES, default="auto",
                       help="decode reads a prefix shared by several requests once (default auto: when it pays)")
        g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="overlap host work with the GPU step (default: on for CUDA)")
        g.add_argument("--attention-backend", choices=("auto", "torch", "triton"), default="auto",
                       help="attention kernels (default auto)")
        g.add_argument("--skip-tokenizer-init", action="store_true",
                       help="load no tokenizer: prompts and outputs are token ids")
        g.add_argument("--cpu-weight-format", choices=("auto", "fp16", "fp32"), default="auto",
                       help="CPU GEMM weights of unquantized layers (default auto: fp16 for 16-bit checkpoints; "
                            "fp16 / fp32 also dequantize a GGUF's 4/8-bit blocks)")
        g.add_argument("--generation-config", default="auto",
                       help="'auto': default sampling parameters from the model's generation_config.json; "
                            "'vllm': nanovllm's defaults")
        g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                       help="split the model over this many GPUs (or CPU processes with --device cpu); "
                            "default 1. See docs/parallelism.md")
        g.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS, default=None,
                       help="uni = one process, mp = one process per rank (default: mp when -tp > 1)")
        g.add_argument("--kv-cache-dtype", default="auto",
                       help="auto (the model's dtype, default) or fp8 (e4m3 with per-layer, per-KV-head scales: "
                            "twice the tokens in the same memory)")
        g.add_argument("--kv-cache-scales", default=None, type=_float_or_path,
                       help="fp8 KV cache scales: a number (every layer and head) or a JSON file "
                            "{\"k\": [[per KV head] per layer], \"v\": ...} (default: calibrated at start-up)")
        g.add_argument("--quantization", "-q", default=None, type=str.lower, choices=QUANTIZATIONS,
                       help="quantize the weights at load: int8 (per channel), int4 (groups of 128), fp8 (e4m3); "
                            "default: as the checkpoint is (GPTQ / AWQ / GGUF stay quantized). docs/quantization.md")
        g.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head (with --quantization)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        """From parsed flags; a None where the field has a non-None default keeps the default."""
        values = {}
        for f in fields(cls):
            if f.name == "compat" or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if value is None and f.default is not None:
                continue
            values[f.name] = value
        return cls(**values)

    def as_kwargs(self) -> dict:
        """Keyword arguments for LLM(...) that rebuild these EngineArgs."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "compat"}
        return {**values, **self.compat}

    def replace(self, **changes) -> "EngineArgs":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- argparse value types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], e.g. 0.9, got {value}")
    return value


def _dtype(text: str) -> str:
    value = DTYPE_ALIASES.get(text, text)
    if value not in SUPPORTED_DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(SUPPORTED_DTYPES)}")
    return value


def _float_or_path(text: str):
    """--kv-cache-scales: a number is a scale, anything else a JSON file path."""
    try:
        return float(text)
    except ValueError:
        return text


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
