"""Build a ready-to-run model from a ModelSource and its HF config: weights, dtype, device.

Used by the worker (it imports the model classes); the engine reads only model_info.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from nanovllm.layers.quantized_linear import quantize_modules, quantized_modules
from nanovllm.layers.tp_group import SINGLE, TPGroup, building_with
from nanovllm.loading.gptq_awq import group_quantized_tensors
from nanovllm.loading.quant_plan import plan_quantization
from nanovllm.loading.resolve import ModelSource
from nanovllm.loading.safetensors_loader import iter_safetensors
from nanovllm.loading.weights import load_weights
from nanovllm.models.registry import resolve_model_class

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device='cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(requested: str, hf_config, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU; on GPU the checkpoint's half type, bf16 for fp32/GGUF checkpoints."""
    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
        return dtype
    if device.type == "cpu":
        return torch.float32
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = DTYPES.get(cfg_dtype)
    return torch.float16 if cfg_dtype == torch.float16 else torch.bfloat16


def build_model(source: ModelSource, hf_config, device: torch.device, dtype: torch.dtype, max_positions: int,
                load_format: str = "auto", quantization: Optional[str] = None, quantize_lm_head: bool = False,
                cpu_weight_format: str = "auto", tp: TPGroup = SINGLE):
    """Instantiate the architecture, swap in quantized linears where the plan says
    (quant_plan.py), and load the weights (`load_format='dummy'`: random weights).
    With a tensor-parallel group the model holds, and reads, only `tp.rank`'s shards
    (quantized layers do not shard: the plan keeps everything float there)."""
    model_cls = resolve_model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), building_with(tp):
            model = model_cls(hf_config, max_positions)
    finally:
        torch.set_default_dtype(previous)
    for module in model.modules():  # RoPE tables stay fp32 whatever the model's dtype
        for name, buf in list(module.named_buffers(recurse=False)):
            if name.startswith("cos_sin_cache"):
                setattr(module, name, buf.float())
    plan = plan_quantization(model, source, hf_config, quantization, quantize_lm_head, device.type,
                             cpu_weight_format, load_format, tp_size=tp.world_size)
    if plan.specs:
        quantize_modules(model, plan.specs)
    if load_format == "dummy":
        init_random_weights(model)
    elif source.kind == "gguf":
        from nanovllm.loading.gguf_loader import read_gguf_checkpoint

        ckpt = read_gguf_checkpoint(source.path)
        load_weights(model, ((name, t, source.path) for name, t in ckpt.iter_tensors(keep_quantized=plan.gguf_codes)))
    else:
        tensors = iter_safetensors(source.path)
        if plan.prequant is not None:
            tensors = group_quantized_tensors(tensors, plan.prequant)
        load_weights(model, tensors)
    missing = [name for name, m in quantized_modules(model).items() if not m.loaded]
    if missing and load_format != "dummy":
        raise ValueError(f"{source.path}: no weight reached the quantized layer(s) {', '.join(missing[:5])}")
    return model.eval()


def checkpoint_is_16bit_or_less(source: ModelSource, hf_config) -> bool:
    """GGUF files (quantized or f16 in practice) and bf16/fp16 HF checkpoints."""
    if source.kind == "gguf":
        return True
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return str(cfg_dtype).replace("torch.", "") in ("bfloat16", "float16")


def maybe_pack_cpu_weights(model, fmt: str, source: ModelSource, hf_config) -> bool:
    """Pack every Linear's weight to fp16 for fbgemm on CPU (see Linear.pack_fp16_for_cpu)."""
    from nanovllm.layers.linear import Linear, cpu_fp16_gemm_available

    want = fmt == "fp16" or (fmt == "auto" and checkpoint_is_16bit_or_less(source, hf_config))
    if not want or next(model.parameters()).dtype != torch.float32:
        return False
    if not cpu_fp16_gemm_available():
        if fmt == "fp16":
            raise ValueError("cpu_weight_format='fp16' needs torch's fbgemm backend (x86); use 'fp32'")
        return False
    packed = False
    for module in model.modules():
        if isinstance(module, Linear) and not getattr(module, "quantized", False):  # quantized: their own format
            module.pack_fp16_for_cpu()
            packed = True
    return packed


# Random-weight benchmarks: small init keeps activations finite through many layers.
DUMMY_INIT_STD = 0.02


@torch.no_grad()
def init_random_weights(model, seed: int = 0) -> None:
    """Random weights; quantized layers get random float rows quantized like a checkpoint's."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif getattr(p, "tp_shard", None) is not None and p.tp_shard.skip:
            p.zero_()  # held by another rank (a row-parallel bias): zero here, as when loading
        else:
            p.normal_(0.0, DUMMY_INIT_STD, generator=gen)
    for name, module in quantized_modules(model).items():
        for shard, (_, rows) in module.shard_offsets.items():
            w = torch.empty(rows, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
            module.load_weight(module.weight, w.normal_(0.0, DUMMY_INIT_STD, generator=gen), shard, name=name)
