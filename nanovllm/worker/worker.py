"""Worker: owns one model replica's whole life, and runs the engine's steps on it.

    Worker(config, model_info)          device, dtype, build the model, load weights, kernel
                                        options, CPU weight packing, GEMV calibration, fp8 KV
                                        scales (calibrated or given)
    determine_num_kv_blocks()           from the memory left after a profiling forward (GPU),
                                        in tokens (CPU), or config.num_kv_blocks
    initialize_cache(num_blocks)        allocate the KV cache, capture the decode CUDA graphs
    launch(step) / resolve(handle)      one step: StepInput -> StepOutput (step_io.py)

The stages are separate calls so that an executor with several workers (tensor parallelism:
one per GPU, each in its own process) can agree on one block count (the minimum over the
workers) before any of them allocates. Under tensor parallelism a worker is one rank: it
builds its shard of the model over the rank's `TPGroup` and runs the same steps as the
others; rank 0 samples (model_runner.py). Everything the worker decides (kernel options, the
GEMV row limits) lives on its own model's modules: two workers in one process never see
each other's choices.
"""

from __future__ import annotations

import gc
import logging
from typing import Optional

import torch

from nanovllm.config import EngineConfig
from nanovllm.loading import model_loader
from nanovllm.loading.model_info import ModelInfo
from nanovllm.layers import ops
from nanovllm.layers.attention.cascade import CascadeRule, cascade_rule
from nanovllm.layers.kernel_options import KernelOptions, configure_kernels
from nanovllm.layers.linear import set_gemv_rows
from nanovllm.layers.moe import active_param_bytes
from nanovllm.layers.quantized_linear import describe_quantization, unquantized_weight_bytes, weight_bytes
from nanovllm.layers.tp_group import SINGLE, TPGroup
from nanovllm.step_io import StepInput, StepOutput, WorkerInfo
from nanovllm.kernels import kv_quant
from nanovllm.worker import kv_scales, memory
from nanovllm.worker.model_runner import LaunchedStep, ModelRunner, RunnerOptions
from nanovllm.worker.timeline import ModelCost, StepTimeline

logger = logging.getLogger("nanovllm")


def kv_sliding_window(model) -> Optional[int]:
    """The widest sliding window when every attention layer has one (Mistral), else None (any
    global layer, as in Gemma, reads the whole context: no KV block may be freed early)."""
    windows = [a.sliding_window for a in model.attention_layers()]
    return None if not windows or None in windows else max(windows)


class Worker:
    def __init__(self, config: EngineConfig, model_info: ModelInfo, step_timer=None, tp: TPGroup = SINGLE,
                 device: Optional[torch.device] = None) -> None:
        """`tp`: this worker's rank of a tensor-parallel group; `device`: the rank's device
        (default: config.device resolved)."""
        self.config = config
        self.model_info = model_info
        self.step_timer = step_timer  # the engine's StepTimer in-process (step_timing=True), else None
        self.tp = tp
        self.device = device if device is not None else model_loader.resolve_device(config.device)
        self.dtype = model_loader.resolve_dtype(config.dtype, model_info.hf_config, self.device)
        self.model = model_loader.build_model(model_info.source, model_info.hf_config, self.device, self.dtype,
                                              model_info.max_model_len, config.load_format, config.quantization,
                                              config.quantize_lm_head, config.cpu_weight_format, tp=tp)
        self.kernel_options = KernelOptions(
            triton=config.use_triton, triton_attention=config.attention_backend != "torch", pdl=config.pdl,
            fuse_gemv_prologues=config.fuse_gemv_prologues,
        )
        configure_kernels(self.model, self.kernel_options)
        self.cpu_fp16_weights = self.device.type == "cpu" and model_loader.maybe_pack_cpu_weights(
            self.model, config.cpu_weight_format, model_info.source, model_info.hf_config)
        if self.device.type == "cuda":
            self.calibrate_quantized()
            self.calibrate_gemv()
        self.kv_cache_dtype = kv_quant.FP8_DTYPE if config.kv_cache_dtype == "fp8" else self.dtype
        if config.kv_cache_dtype == "fp8":
            self.set_kv_scales()
        self.kv_bytes_per_block = memory.kv_bytes_per_block(self.model, config.block_size, self.kv_cache_dtype)
        self.runner: Optional[ModelRunner] = None

    def calibrate_gemv(self) -> dict:
        """Small-batch decode GEMMs: the Triton skinny GEMM where it beats cuBLAS on this GPU and
        these shapes (timed before the KV cache takes the free memory and before graphs)."""
        from nanovllm.kernels.gemv import GEMV_MAX_M
        from nanovllm.worker.gemv_calibration import calibrate_gemv, row_limits

        result = calibrate_gemv(self.model, self.device, max_m=min(GEMV_MAX_M, self.config.max_num_seqs),
                                mode=self.config.gemv, options=self.kernel_options)
        set_gemv_rows(self.model, row_limits(result))
        return result

    def calibrate_quantized(self) -> dict:
        """Quantized layers: up to which row count the skinny and the tensor-core kernels serve,
        timed against the other paths on this GPU (worker/quant_calibration.py)."""
        from nanovllm.worker.quant_calibration import calibrate_quantized

        return calibrate_quantized(self.model, self.device, mode=self.config.gemv, options=self.kernel_options,
                                   max_rows=self.config.max_num_seqs)

    def set_kv_scales(self) -> None:
        """fp8 KV cache: each attention layer's K / V scales, given or calibrated (worker/kv_scales.py)."""
        cfg = self.config
        if cfg.kv_cache_scales is not None:
            scales = kv_scales.load_scales(cfg.kv_cache_scales, self.model)
        else:
            # positions past max_model_len have no RoPE entry: calibrate within the model's window
            seq_len = min(kv_scales.CALIBRATION_LEN, self.model_info.max_model_len)
            amax = kv_scales.calibrate_amax(self.model, self.device, self.dtype, cfg.block_size,
                                            self.model_info.hf_config.vocab_size, seq_len=seq_len)
            scales = kv_scales.scales_from_calibration(amax)
        kv_scales.apply_scales(self.model, scales, self.device)
        logger.info("fp8 KV cache (%s): %s", "given scales" if cfg.kv_cache_scales is not None else "calibrated",
                    kv_scales.summary(self.model))

    # ------------------------------------------------------------------ KV cache
    def determine_num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type == "cpu":
            return memory.cpu_num_kv_blocks(cfg, self.model_info.max_model_len, self.kv_bytes_per_block)
        return memory.profile_num_kv_blocks(self.model, cfg, self.device, self.kv_cache_dtype,
                                            self.model_info.max_model_len, self.kv_bytes_per_block)

    def initialize_cache(self, num_blocks: int) -> WorkerInfo:
        """Allocate `num_blocks` KV blocks and capture the decode graphs; the worker is then ready."""
        cfg = self.config
        self.runner = ModelRunner(self.model, self.device, self.kv_cache_dtype, num_blocks, cfg.block_size,
                                  list(self.model_info.eos_token_ids), step_timer=self.step_timer,
                                  options=RunnerOptions.of(cfg, self.kernel_options, self.model_info.max_model_len),
                                  tp=self.tp)
        self.runner.cascade_rule = self._cascade_rule()
        if self.device.type == "cuda" and not cfg.enforce_eager and not triton_attention_on(self.kernel_options):
            logger.info("CUDA graphs off: the torch attention path reads sequence lengths on the host, "
                        "which a graph cannot capture (attention_backend='triton' keeps them)")
        elif self.device.type == "cuda" and not cfg.enforce_eager:
            from nanovllm.worker.cuda_graphs import CascadeGraphSpec, CUDAGraphRunner

            spec = None
            if self.runner.cascade_rule is not None:
                spec = CascadeGraphSpec(self.runner.cascade_queries_per_tile, self.runner.cascade_rule.max_groups,
                                        self.model.attention_layers()[0].num_kv_heads)
            self.runner.cuda_graphs = CUDAGraphRunner(self.runner, cfg.max_num_seqs, self.model_info.max_model_len,
                                                      prefill_tokens=cfg.max_prefill_tokens_while_decoding or 0,
                                                      cascade=spec)
            self.runner.cuda_graphs.capture()
        info = self.info()
        if cfg.step_timeline:
            cost = ModelCost.of(self.model, info.param_bytes, self.kv_bytes_per_block // cfg.block_size)
            self.runner.timeline = StepTimeline(cost, self.device)
        return info

    def _cascade_rule(self) -> Optional[CascadeRule]:
        """When steps get a cascade plan: the config's mode, where a backend serves plans (Triton
        attention on CUDA; the torch path on CPU, decode groups only) and some layer can use them."""
        if all(a.sliding_window is not None for a in self.model.attention_layers()):
            return None
        if self.config.kv_cache_dtype == "fp8":  # the cascade kernels read no fp8 cache (EngineConfig: off)
            return None
        if self.device.type == "cuda":
            if not triton_attention_on(self.kernel_options):
                return None
            return cascade_rule(self.config.cascade_attention, chunk_contexts=True)
        return cascade_rule(self.config.cascade_attention, chunk_contexts=False)

    def info(self) -> WorkerInfo:
        unique = {id(p): p for p in self.model.parameters()}
        stored = weight_bytes(self.model)  # quantized layers' codes live in buffers, not parameters
        quantized_extra = stored - sum(p.numel() * p.element_size() for p in unique.values())
        return WorkerInfo(
            num_kv_blocks=self.runner.num_kv_blocks if self.runner is not None else 0,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            kv_bytes_per_block=self.kv_bytes_per_block,
            kv_cache_dtype=str(self.kv_cache_dtype).replace("torch.", ""),
            param_bytes=stored,
            param_bytes_unquantized=unquantized_weight_bytes(self.model, self.dtype),
            quantization=describe_quantization(self.model),
            cuda_graphs=self.runner is not None and self.runner.cuda_graphs is not None,
            cpu_fp16_weights=self.cpu_fp16_weights,
            tensor_parallel_size=self.tp.world_size,
            kv_sliding_window=kv_sliding_window(self.model),
            active_param_bytes=active_param_bytes(unique.values(), self.model) + quantized_extra,
        )

    # ------------------------------------------------------------------ steps
    def launch(self, step: StepInput) -> LaunchedStep:
        return self.runner.launch(step)

    def resolve(self, handle: LaunchedStep) -> StepOutput:
        return self.runner.resolve(handle)

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.resolve(self.runner.launch(step))

    def shutdown(self) -> None:
        """Drop the model and the cache, and give their device memory back to the driver: another
        engine, or a worker process that sizes its KV cache from the free memory, starts next."""
        self.runner = None
        self.model = None
        if self.device.type == "cuda":
            gc.collect()  # CUDA graphs and their runner hold one another: a cycle, freed only here
            torch.cuda.empty_cache()


def triton_attention_on(options: KernelOptions) -> bool:
    """Whether attention runs through Triton on CUDA: what CUDA graphs need (the torch reference
    path indexes sequences from the host) and what serves cascade plans there."""
    return options.triton and options.triton_attention and ops.triton_available()
