"""Which linear layers of a model are kept quantized, and in which format: from the engine's
`quantization` / `quantize_lm_head` settings and what the checkpoint already is.

  checkpoint          quantization=None                     quantization="int8" | "int4" | "fp8"
  bf16 / fp16 / fp32  nothing quantized                     every decoder linear in that format
  GPTQ / AWQ          as the checkpoint (int4, GPTQ int8)   must match the checkpoint, else refused
  GGUF                each layer as its tensors: Q4_0 /     that format for every decoder linear;
                      Q4_1 / Q4_K -> int4 (groups of 32),   GGUF codes that already are it stay
                      Q8_0 / Q6_K -> int8 (32 / 16), other  (Q4_* as int4, Q8_0 / Q6_K as int8),
                      types float                           the rest is requantized from float

MoE routers stay float, and the stacked experts of a FusedMoE are not linear layers (float
too). The LM head stays as the checkpoint has it (float, or a GGUF's quantized output / tied
embedding tensor) unless `quantize_lm_head`; the embedding table is always float. On CPU
with quantization=None and an explicit cpu_weight_format ("fp16" / "fp32") a GGUF is
dequantized as before (the fbgemm fp16 / fp32 paths).

Quantized layers do not shard yet: under tensor parallelism (`tp_size > 1`) a GGUF is
dequantized at load as before, and `quantization` or a GPTQ / AWQ checkpoint is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from nanovllm.kernels.quant_formats import QTYPES, int4_group_size
from nanovllm.layers.linear import Linear
from nanovllm.layers.quantized_linear import LinearQuantSpec
from nanovllm.loading.gptq_awq import PrequantConfig, parse_quantization_config
from nanovllm.loading.resolve import ModelSource

LM_HEAD = "lm_head"
GGUF_INT4 = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 32}  # kept as int4 with these groups
GGUF_INT8 = {"Q8_0": 32, "Q6_K": 16}  # kept as int8 with these groups
GGUF_EMBEDDING = "model.embed_tokens.weight"
ROUTER_SUFFIX = ".gate"  # an MoE router (layers/moe.py): tiny, and its scores pick the experts: kept float


@dataclass
class QuantPlan:
    specs: dict[str, LinearQuantSpec] = field(default_factory=dict)  # module name -> format
    prequant: Optional[PrequantConfig] = None  # GPTQ / AWQ checkpoint
    gguf_codes: bool = False  # read GGUF blocks as codes (some layer keeps them)

    @property
    def qtypes(self) -> set[str]:
        return {s.qtype for s in self.specs.values()}


def plan_quantization(model: nn.Module, source: ModelSource, hf_config, quantization: Optional[str],
                      quantize_lm_head: bool = False, device_type: str = "cuda",
                      cpu_weight_format: str = "auto", load_format: str = "auto", tp_size: int = 1) -> QuantPlan:
    if quantization is not None and quantization not in QTYPES:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {QTYPES} or None")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    decoder = [n for n in linears if n != LM_HEAD and not n.endswith(ROUTER_SUFFIX)]
    prequant = parse_quantization_config(hf_config) if source.kind != "gguf" and load_format != "dummy" else None
    if tp_size > 1:
        _refuse_sharded(quantization, prequant, tp_size)
        return QuantPlan()  # GGUF: dequantized at load, then split like a float checkpoint
    if prequant is not None:
        return _prequant_plan(prequant, decoder, quantization, quantize_lm_head)
    if source.kind == "gguf" and load_format != "dummy":
        legacy_cpu = device_type == "cpu" and quantization is None and cpu_weight_format != "auto"
        # On a GPU the blocks stay quantized only when asked (quantization=...): the quantized CUDA
        # path has not yet passed the GPU suite, the dequantized bf16 path has.
        gpu_default = device_type == "cuda" and quantization is None
        if not (legacy_cpu or gpu_default):
            return _gguf_plan(model, source, linears, quantization, quantize_lm_head)
    if quantization is None:
        return QuantPlan()
    names = decoder + ([LM_HEAD] if quantize_lm_head and LM_HEAD in linears else [])
    return QuantPlan({n: _default_spec(quantization, linears[n].in_features) for n in names})


def _refuse_sharded(quantization: Optional[str], prequant: Optional[PrequantConfig], tp_size: int) -> None:
    if quantization is not None:
        raise ValueError(f"quantization={quantization!r} needs tensor_parallel_size=1 (got {tp_size}): quantized "
                         "layers are not split across GPUs yet; drop the quantization or use one GPU")
    if prequant is not None:
        raise ValueError(f"this {prequant.method.upper()} checkpoint needs tensor_parallel_size=1 (got {tp_size}): "
                         "quantized layers are not split across GPUs yet; use one GPU or a bf16/fp16 checkpoint")


def _default_spec(qtype: str, k: int) -> LinearQuantSpec:
    return LinearQuantSpec(qtype, int4_group_size(k) if qtype == "int4" else None)


def _prequant_plan(cfg: PrequantConfig, decoder: list[str], quantization: Optional[str],
                   quantize_lm_head: bool) -> QuantPlan:
    qtype = "int4" if cfg.bits == 4 else "int8"
    if quantization not in (None, qtype):
        raise ValueError(f"the checkpoint is already quantized ({cfg.method}, {cfg.bits} bits); leave quantization "
                         f"unset or pass quantization={qtype!r}")
    if quantize_lm_head:
        raise ValueError("quantize_lm_head applies to bf16/fp16 checkpoints; a GPTQ/AWQ checkpoint's head is "
                         "used as it is stored")
    skip = tuple(cfg.modules_to_not_convert)
    group = None if cfg.group_size == -1 else cfg.group_size
    specs = {n: LinearQuantSpec(qtype, group if qtype == "int4" else None if group is None else group)
             for n in decoder if not any(s in n for s in skip)}
    if qtype == "int4" and group is None:  # one group per row: the layers' K
        specs = {n: LinearQuantSpec("int4", None) for n in specs}
    return QuantPlan(specs, prequant=cfg)


def _gguf_plan(model: nn.Module, source: ModelSource, linears: dict, quantization: Optional[str],
               quantize_lm_head: bool) -> QuantPlan:
    from nanovllm.loading.gguf_loader import read_gguf_checkpoint

    types = read_gguf_checkpoint(source.path).tensor_types()
    packed = getattr(model, "packed_modules_mapping", {})
    shards: dict[str, list[str]] = {}
    for hf_name, ggml in types.items():
        target = hf_name
        for fragment, (packed_fragment, _) in packed.items():
            if f".{fragment}." in hf_name:
                target = hf_name.replace(f".{fragment}.", f".{packed_fragment}.")
                break
        module = target.rsplit(".", 1)[0]
        if module in linears and target.endswith(".weight"):
            shards.setdefault(module, []).append(ggml)
    if LM_HEAD in linears and LM_HEAD not in shards and GGUF_EMBEDDING in types:
        shards[LM_HEAD] = [types[GGUF_EMBEDDING]]  # tied: the head is the embedding tensor
    specs = {}
    for name, module in linears.items():
        kinds = shards.get(name, [])
        wanted = quantization if name != LM_HEAD else (quantization if quantize_lm_head else None)
        spec = _gguf_spec(kinds, wanted, module.in_features)
        if spec is not None:
            specs[name] = spec
    return QuantPlan(specs, gguf_codes=bool(specs))


def _gguf_spec(kinds: list[str], wanted: Optional[str], k: int) -> Optional[LinearQuantSpec]:
    int8_groups = [GGUF_INT8[t] for t in kinds if t in GGUF_INT8]
    all_int4 = bool(kinds) and all(t in GGUF_INT4 for t in kinds)
    if wanted is None:
        if all_int4:
            return LinearQuantSpec("int4", 32)
        if int8_groups or any(t in GGUF_INT4 for t in kinds):
            return LinearQuantSpec("int8", min(int8_groups) if int8_groups else None)
        return None  # float tensors stay float
    if wanted == "int4":
        return LinearQuantSpec("int4", 32 if any(t in GGUF_INT4 for t in kinds) else int4_group_size(k))
    if wanted == "int8":
        return LinearQuantSpec("int8", min(int8_groups) if int8_groups else None)
    return LinearQuantSpec("fp8")
