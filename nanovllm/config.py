"""Engine configuration: one frozen dataclass, validated on construction.

Everything the user can set on `LLM(...)` lives here; anything derived from the
model (hidden size, number of layers...) lives on the model's HF config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# On CPU there is no "free memory" to measure; the cache is sized in tokens.
DEFAULT_CPU_KV_CACHE_TOKENS = 65536
SUPPORTED_DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
LOAD_FORMATS = ("auto", "dummy")
GEMV_MODES = ("auto", "off", "force")
QUANTIZATIONS = ("int8", "int4", "fp8")
QUANTIZATION_ALIASES = {"none": None, "w8a16": "int8", "w4a16": "int4", "fp8_e4m3": "fp8", "e4m3": "fp8"}
KV_CACHE_DTYPES = ("auto", "fp8")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8", "float8_e4m3fn": "fp8"}
DECODE_SPLITS = ("uniform", "balanced")
CASCADE_MODES = ("auto", "off", "force")  # layers/attention/cascade.py (mirrored: config imports nothing)
# How the engine reaches its workers (vLLM's names): "uni" = one worker in the engine's process,
# "mp" = one process per tensor-parallel rank (rank 0's worker in the engine's process).
EXECUTOR_BACKENDS = ("uni", "mp")


@dataclass(frozen=True)
class EngineConfig:
    """User-facing engine settings (validated; bad values raise ValueError/TypeError)."""

    model: Optional[str] = None  # HF dir, HF cache repo id, .gguf file; None = bundled default
    dtype: str = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    max_model_len: Optional[int] = None  # None = model's max_position_embeddings (capped)
    # A max_model_len beyond the model's max_position_embeddings is refused unless this is set
    # (positions the model was never trained on; vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN=1).
    allow_long_max_model_len: bool = False
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: Optional[int] = None  # None = sized from memory
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Chunked prefill's fairness policy: while any request is decoding, a step computes at most
    # this many prompt tokens (a long prompt is spread over steps, so the decodes keep their
    # pace), and CUDA graphs also cover steps of up to max_num_seqs decodes + this many prompt
    # tokens. None = only max_num_batched_tokens limits a step (best offline throughput).
    max_prefill_tokens_while_decoding: Optional[int] = None
    # Shared prefixes (prefix-cache hits, n > 1) read once per step for all requests sharing them,
    # merged with each request's own part by log-sum-exp (docs/memory.md): "auto" = when the rule
    # of layers/attention/cascade.py says it pays, "force" = whenever any whole block is shared
    # (tests, A/B), "off". Results are the same either way. An fp8 KV cache keeps it off.
    cascade_attention: str = "auto"
    enforce_eager: bool = False  # True disables CUDA graphs
    # Schedule and launch step N+1 before step N's tokens reach the host, so host work
    # overlaps GPU work. None = on for CUDA devices (CPU steps run synchronously anyway).
    async_scheduling: Optional[bool] = None
    attention_backend: str = "auto"  # "auto" | "torch" | "triton"
    skip_tokenizer_init: bool = False
    # CPU GEMM weights of unquantized layers: "fp16" (fbgemm, half the bytes), "fp32", or "auto" = fp16
    # when the checkpoint itself is 16-bit (bf16/fp16 safetensors, GGUF), else fp32. An explicit "fp16" /
    # "fp32" without `quantization` also dequantizes a GGUF's blocks (otherwise kept 4/8-bit).
    cpu_weight_format: str = "auto"
    seed: int = 0
    tokenizer: Optional[str] = None  # override tokenizer location
    trust_remote_code: bool = False
    # ---- where a hub model comes from (repo ids not in the local cache are downloaded)
    download_dir: Optional[str] = None  # Hugging Face cache directory (default: HF_HUB_CACHE)
    revision: Optional[str] = None  # branch, tag or commit of a hub repo
    # "auto": the model's generation_config.json gives the default sampling parameters;
    # "vllm": nanovllm's own defaults
    generation_config: str = "auto"
    # ---- weight formats
    load_format: str = "auto"  # "auto" = the checkpoint's weights; "dummy" = random weights (benchmarks)
    # Weight-only quantization at load: "int8" (per output channel), "int4" (groups of 128 along K,
    # scales and zero points), "fp8" (e4m3, per output channel), or None = as the checkpoint is
    # (GPTQ / AWQ / GGUF stay quantized). docs/quantization.md.
    quantization: Optional[str] = None
    quantize_lm_head: bool = False  # also quantize the LM head (the embedding table stays as it is)
    # ---- kernel choices (GPU). The matching NANOVLLM_* variables (envs.py) override them for A/B runs.
    # Decode-sized GEMMs (<= 8 rows): "auto" = the Triton skinny GEMM for the weight shapes and row
    # counts where start-up timing finds it faster than cuBLAS; "off" = cuBLAS; "force" = Triton
    # for every shape, untimed (tests, A/B).
    gemv: str = "auto"
    fuse_gemv_prologues: bool = True  # the RMSNorm / SiLU-and-mul before a skinny GEMM runs inside it
    pdl: bool = True  # programmatic dependent launch of the decode kernels (Hopper and newer)
    use_triton: bool = True  # False: every op through its pure-torch reference (debugging)
    step_timing: bool = False  # accumulate the wall time of each phase of a step (engine.step_timer)
    # ---- KV cache format. "auto" = the model's dtype; "fp8" = float8 e4m3 with one scale per layer and KV
    # head (twice the tokens in the same memory; attention dequantizes in registers; docs/architecture.md).
    kv_cache_dtype: str = "auto"
    # fp8 scales: None = calibrated at start-up from the K/V of a forward over random tokens; a float =
    # that scale for every layer and head; a str = a JSON file {"k": [[per head] per layer], "v": ...}.
    kv_cache_scales: Optional[Union[float, str]] = None
    # ---- throughput switches (GPU; A/B benchmarks)
    # Decode attention work split: "uniform" = every sequence of a batch in the same number of splits;
    # "balanced" = per-request splits of about the batch's mean context, so no program of the grid
    # carries a long context alone (mixed lengths).
    decode_split: str = "uniform"
    step_timeline: bool = False  # record a per-step timeline (worker.runner.timeline; `bench throughput --timeline`)
    # ---- parallelism (docs/parallelism.md)
    tensor_parallel_size: int = 1  # ranks one model is split over (GPUs, or CPU processes)
    # None = "uni" at tensor_parallel_size 1, else "mp"; "mp" at size 1 runs the multi-process
    # executor's path with one rank (A/B against "uni")
    distributed_executor_backend: Optional[str] = None
    # ---- serving (AsyncLLMEngine, `nanovllm serve --engine-process`): run the engine (scheduling, steps,
    # detokenization) in a process of its own, so its host work does not share a GIL with the HTTP layer.
    # The offline LLM class steps the engine on its caller's thread whatever this says.
    engine_process: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"model must be a path or repo id string, got {type(self.model).__name__}")
        if not isinstance(self.dtype, str):
            raise TypeError(f"dtype must be a string such as 'bfloat16', got {self.dtype!r}")
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two (e.g. 16)")
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if not isinstance(self.allow_long_max_model_len, bool):
            raise TypeError(f"allow_long_max_model_len must be True or False, got {self.allow_long_max_model_len!r}")
        if self.num_kv_blocks is not None:
            _positive_int("num_kv_blocks", self.num_kv_blocks)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization!r} must be in (0, 1], e.g. 0.9"
            )
        if self.cpu_weight_format not in ("auto", "fp16", "fp32"):
            raise ValueError(f"cpu_weight_format={self.cpu_weight_format!r}: use 'auto', 'fp16' or 'fp32'")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend={self.attention_backend!r}: use 'auto', 'torch' or 'triton'")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise TypeError(f"async_scheduling must be True, False or None (auto), got {self.async_scheduling!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r}: use one of {LOAD_FORMATS}")
        if self.cascade_attention not in CASCADE_MODES:
            raise ValueError(f"cascade_attention={self.cascade_attention!r}: use 'auto' (when it pays), "
                             f"'force' (whenever blocks are shared) or 'off'")
        if self.max_prefill_tokens_while_decoding is not None:
            _positive_int("max_prefill_tokens_while_decoding", self.max_prefill_tokens_while_decoding)
            if not self.enable_chunked_prefill:
                raise ValueError("max_prefill_tokens_while_decoding chunks prompts: it needs enable_chunked_prefill=True "
                                 "(or leave it None)")
        if self.gemv not in GEMV_MODES:
            raise ValueError(f"gemv={self.gemv!r}: use 'auto' (calibrated), 'off' (cuBLAS) or 'force' (Triton)")
        if self.quantization is not None:
            if not isinstance(self.quantization, str):
                raise TypeError(f"quantization must be a string such as 'int8', got {self.quantization!r}")
            key = self.quantization.strip().lower()
            quantization = QUANTIZATION_ALIASES[key] if key in QUANTIZATION_ALIASES else key
            if quantization is not None and quantization not in QUANTIZATIONS:
                raise ValueError(f"quantization={self.quantization!r} is not supported; use one of "
                                 f"{', '.join(QUANTIZATIONS)} or None")
            object.__setattr__(self, "quantization", quantization)
        if self.quantize_lm_head and self.quantization is None:
            raise ValueError("quantize_lm_head=True needs quantization='int8', 'int4' or 'fp8'")
        kv_dtype = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use 'auto' (the model's dtype) or 'fp8'")
        object.__setattr__(self, "kv_cache_dtype", kv_dtype)
        _check_kv_cache_scales(self.kv_cache_scales, kv_dtype)
        if kv_dtype == "fp8" and self.cascade_attention == "force":
            raise ValueError("cascade_attention='force' does not read an fp8 KV cache (its kernels take bf16/fp16/fp32 "
                             "K/V): use cascade_attention='auto' or 'off' with kv_cache_dtype='fp8', or kv_cache_dtype='auto'")
        if kv_dtype == "fp8":  # 'auto' with an fp8 cache: cascade stays off (the plain kernels read fp8)
            object.__setattr__(self, "cascade_attention", "off")
        if self.decode_split not in DECODE_SPLITS:
            raise ValueError(f"decode_split={self.decode_split!r}: use one of {DECODE_SPLITS}")
        for name in ("fuse_gemv_prologues", "pdl", "use_triton", "step_timing", "step_timeline",
                     "quantize_lm_head", "engine_process"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        for name in ("download_dir", "revision", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise TypeError(f"generation_config must be 'auto', 'vllm' or a directory, got {self.generation_config!r}")
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend={backend!r}: use 'uni' (one process), 'mp' "
                             f"(one process per rank) or None (chosen from tensor_parallel_size)")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one process, but tensor_parallel_size="
                             f"{self.tensor_parallel_size} needs one per rank: use 'mp' or leave it unset")

    @property
    def executor_backend(self) -> str:
        """'uni' or 'mp', with None resolved from tensor_parallel_size."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if self.tensor_parallel_size > 1 else "uni"


def _check_kv_cache_scales(scales, kv_dtype: str) -> None:
    if scales is None:
        return
    if kv_dtype != "fp8":
        raise ValueError("kv_cache_scales only applies to kv_cache_dtype='fp8'; drop it or set kv_cache_dtype='fp8'")
    if isinstance(scales, bool) or not isinstance(scales, (int, float, str)):
        raise TypeError(f"kv_cache_scales must be a positive float or a JSON file path, got {type(scales).__name__}")
    if not isinstance(scales, str) and not (math.isfinite(scales) and scales > 0):
        raise ValueError(f"kv_cache_scales={scales!r} must be a positive, finite float (or a JSON file path)")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}={value} must be a positive integer")
